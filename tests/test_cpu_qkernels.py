"""Tests for kiln's weight-only quantized CPU kernels (targets/cpu/qkernels.py)."""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

tvm = pytest.importorskip("tvm")

from kiln.targets.cpu import qkernels as cq

TGT = cq.cpu_target()


# --------------------------------------------------------------------------- reference quantization


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, 256])  # 256 == K: per-channel
def test_quantize_rtn_roundtrip(bits: int, sym: bool, group: int) -> None:
    rng = np.random.default_rng(bits * 100 + group + sym)
    n, k = 24, 256
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    q, s, z = cq.quantize_rtn(w, bits, group, sym)
    assert q.shape == (n, k) and q.dtype == np.int32
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    assert s.shape == (n, k // group) and s.dtype == np.float32 and np.all(s > 0)
    if sym:
        assert z is None
    else:
        assert z.shape == s.shape and z.dtype == np.float32 and np.all(z == np.round(z))
        # float zero points: the same error bound, and both ends of every group's range on the grid
        qf, sf, zf = cq.quantize_rtn(w, bits, group, sym, float_zero=True)
        wf = cq.dequantize(qf, sf, zf, bits, group, sym)
        assert np.all(np.abs(wf - w) <= np.repeat(sf, group, axis=1) / 2 * (1 + 1e-5) + 1e-7)
        wg, fg = w.reshape(n, k // group, group), wf.reshape(n, k // group, group)
        np.testing.assert_allclose(fg.min(axis=2), wg.min(axis=2), atol=1e-5 * float(np.abs(w).max()))
        np.testing.assert_allclose(fg.max(axis=2), wg.max(axis=2), atol=1e-5 * float(np.abs(w).max()))
    wdq = cq.dequantize(q, s, z, bits, group, sym)
    assert wdq.shape == (n, k) and wdq.dtype == np.float32
    bound = np.repeat(s, group, axis=1) / 2 * (1 + 1e-5) + 1e-7
    assert np.all(np.abs(wdq - w) <= bound), "RTN error must be at most s/2 per element"
    # the extreme of each group is represented (scale not too large)
    wg = np.abs(w).reshape(n, k // group, group).max(axis=2)
    np.testing.assert_allclose(np.abs(wdq).reshape(n, k // group, group).max(axis=2), wg, rtol=0.51)


def test_quantize_rtn_formulas() -> None:
    w = np.array([[-1.0, -0.25, 0.5, 2.0]], np.float32)
    q, s, z = cq.quantize_rtn(w, 4, 4, sym=True)
    np.testing.assert_allclose(s, [[2.0 / 7]], rtol=1e-6)
    np.testing.assert_array_equal(q, np.clip(np.round(w / s), -8, 7).astype(np.int32) + 8)
    q, s, z = cq.quantize_rtn(w, 4, 4, sym=False)
    np.testing.assert_allclose(s, [[3.0 / 15]], rtol=1e-6)
    np.testing.assert_array_equal(z, [[5.0]])
    np.testing.assert_array_equal(q, np.clip(np.round(w / s) + 5, 0, 15).astype(np.int32))
    # an integer zero point moves the grid by up to s/2 and clips an end of the range (-0.7 -> -0.8,
    # 2.3 -> 2.2); a float one puts both ends on the grid
    w = np.array([[-0.7, -0.15, 0.52, 2.3]], np.float32)
    q, s, z = cq.quantize_rtn(w, 4, 4, sym=False)
    np.testing.assert_array_equal(z, [[4.0]])
    np.testing.assert_allclose(cq.dequantize(q, s, z, 4, 4, False)[0, [0, 3]], [-0.8, 2.2], atol=1e-6)
    q, s, z = cq.quantize_rtn(w, 4, 4, sym=False, float_zero=True)
    np.testing.assert_allclose(z, [[3.5]], rtol=1e-6)
    np.testing.assert_array_equal(q, [[0, 3, 6, 15]])
    np.testing.assert_allclose(cq.dequantize(q, s, z, 4, 4, False)[0, [0, 3]], [-0.7, 2.3], atol=1e-6)
    # degenerate groups reconstruct exactly
    c = np.array([[3.0] * 8, [0.0] * 8], np.float32)
    for sym in (True, False):
        q, s, z = cq.quantize_rtn(c, 4, 8, sym)
        np.testing.assert_allclose(cq.dequantize(q, s, z, 4, 8, sym), c, atol=1e-6)


def test_bad_group_raises() -> None:
    w = np.zeros((8, 96), np.float32)
    with pytest.raises(ValueError, match=r"group=64.*96"):
        cq.quantize_rtn(w, 4, 64, True)
    with pytest.raises(ValueError, match="group"):
        cq.packed_shapes(8, 96, 4, 64, True)
    with pytest.raises(ValueError):
        cq.quantize_rtn(w, 5, 32, True)
    with pytest.raises(ValueError):
        cq.qlinear_func(96, 8, 3, 32, True, False, "gemv")  # no 3-bit kernel


# --------------------------------------------------------------------------- qlinear kernels


@functools.cache
def _kernel(k: int, n: int, bits: int, group: int, sym: bool, has_bias: bool, mode: str):
    func = cq.qlinear_func(k, n, bits, group, sym, has_bias, mode)
    return tvm.compile(tvm.IRModule({"main": func}), target=TGT)["main"]


_QCFG = [
    (4, 32, True),
    (4, 32, False),
    (4, 128, True),
    (4, 128, False),
    (4, 0, True),
    (4, 0, False),
    (8, 32, True),
    (8, 128, False),
    (8, 0, True),
    (8, 0, False),
]  # group 0 = per-channel


@pytest.mark.parametrize("mode", ["gemv", "gemm"])
@pytest.mark.parametrize("k,n", [(64, 40), (256, 96)])
@pytest.mark.parametrize("bits,group,sym", _QCFG)
def test_qlinear(mode: str, k: int, n: int, bits: int, group: int, sym: bool) -> None:
    group = group or k
    if k % group:
        group = k  # group 128 on k=64: per-channel
    has_bias = (bits + group + n) % 2 == 0 or not sym  # both bias variants get covered
    rng = np.random.default_rng(bits * 1000 + group + n + sym)
    w = rng.standard_normal((n, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    q, s, z = cq.quantize_rtn(w, bits, group, sym, float_zero=k == 256)  # asym: float zero points too
    packed = cq.pack_qweight(q, s, z, bits, group, sym)
    shapes = cq.packed_shapes(n, k, bits, group, sym)
    assert [(a.shape, str(a.dtype)) for a in packed] == shapes
    assert isinstance(cq.qweight_layout(bits, group, sym), str)
    wdq = cq.dequantize(q, s, z, bits, group, sym).astype(np.float64)
    f = _kernel(k, n, bits, group, sym, has_bias, mode)
    pt = [tvm.runtime.tensor(a) for a in packed]
    for m in (1, 3, 13, 70):
        x = rng.standard_normal((m, k), dtype=np.float32)
        out = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        f(tvm.runtime.tensor(x), *pt, *([tvm.runtime.tensor(bias)] if has_bias else []), out)
        ref = x.astype(np.float64) @ wdq.T + (bias if has_bias else 0)
        scale = np.abs(x).astype(np.float64) @ np.abs(wdq).T  # cancellation-free magnitude
        err = np.abs(out.numpy() - ref)
        assert np.all(err <= 1e-4 * np.abs(ref) + 1e-5 * scale + 1e-6), (m, float(err.max()))


def test_qlinear_bias_and_no_bias_agree() -> None:
    k, n, bits, group, sym = 256, 96, 4, 32, False
    rng = np.random.default_rng(7)
    w = rng.standard_normal((n, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    pt = [tvm.runtime.tensor(a) for a in cq.pack_qweight(*cq.quantize_rtn(w, bits, group, sym), bits, group, sym)]
    x = tvm.runtime.tensor(rng.standard_normal((5, k), dtype=np.float32))
    o1, o2 = (tvm.runtime.tensor(np.zeros((5, n), np.float32)) for _ in range(2))
    _kernel(k, n, bits, group, sym, True, "gemv")(x, *pt, tvm.runtime.tensor(bias), o1)
    _kernel(k, n, bits, group, sym, False, "gemv")(x, *pt, o2)
    np.testing.assert_allclose(o1.numpy() - bias, o2.numpy(), rtol=1e-5, atol=1e-5)
