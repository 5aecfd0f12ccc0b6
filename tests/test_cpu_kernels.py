"""Tests for kiln's hand-scheduled CPU TIR kernels (targets/cpu/kernels.py)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx

from kiln.targets.cpu import kernels as ck

TGT = ck.cpu_target()


def _build_prim(func: tirx.PrimFunc):
    return tvm.compile(tvm.IRModule({"main": func}), target=TGT)["main"]


# --------------------------------------------------------------------------- linear


@pytest.mark.parametrize("mode", ["gemv", "gemm"])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("k,n", [(24, 40), (576, 1536), (24, 1536), (576, 40)])
def test_linear(mode: str, has_bias: bool, k: int, n: int) -> None:
    rng = np.random.default_rng(k * 7 + n)
    f = _build_prim(ck.linear_func(k, n, has_bias, mode))
    w = rng.standard_normal((n, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    wp = ck.pack_linear_weight(w)
    assert wp.shape == ((n + ck.NB - 1) // ck.NB, k, ck.NB)
    wt = tvm.runtime.tensor(wp)
    for m in (1, 3, 13, 64):
        x = rng.standard_normal((m, k), dtype=np.float32)
        out = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        args = [tvm.runtime.tensor(x), wt] + ([tvm.runtime.tensor(bias)] if has_bias else []) + [out]
        f(*args)
        ref = x.astype(np.float64) @ w.T.astype(np.float64) + (bias if has_bias else 0)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_linear_layout_string() -> None:
    assert isinstance(ck.linear_weight_layout(), str) and str(ck.NB) in ck.linear_weight_layout()


# --------------------------------------------------------------------------- paged attention


def _step_module(H: int, KVH: int, D: int, PS: int, window: int):
    """Relax `step(q, k, v, cache, page_table, positions)`: in-place append, then attention."""
    b, t = tirx.Var("b", "int64"), tirx.Var("t", "int64")
    npg, mp = tirx.Var("num_pages", "int64"), tirx.Var("max_pages", "int64")
    q = relax.Var("q", relax.TensorType([b, t, H, D], "float32"))
    k = relax.Var("k", relax.TensorType([b, t, KVH, D], "float32"))
    v = relax.Var("v", relax.TensorType([b, t, KVH, D], "float32"))
    cache = relax.Var("cache", relax.TensorType([npg, 2, KVH, PS, D], "float32"))
    pt = relax.Var("page_table", relax.TensorType([b, mp], "int32"))
    pos = relax.Var("positions", relax.TensorType([b, t], "int32"))
    bb = relax.BlockBuilder()
    with bb.function("step", [q, k, v, cache, pt, pos]):
        gv_app = bb.add_func(ck.kv_append_func(KVH, D, PS), "kv_append")
        gv_att = bb.add_func(ck.paged_attention_func(H, KVH, D, PS, D**-0.5, window), "paged_attention")
        with bb.dataflow():
            c2 = bb.emit(relax.op.call_tir_inplace(gv_app, [cache, k, v, pt, pos], inplace_indices=0, out_ty=cache.ty))
            o = bb.emit(relax.call_tir(gv_att, [q, c2, pt, pos], out_ty=relax.TensorType([b, t, H, D], "float32")))
            out = bb.emit_output(o)
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=TGT)
    return relax.VirtualMachine(ex, tvm.cpu())


def _ref_attention(q, k, v, p, window):
    """q [H, D] at position p over k/v [L, KVH, D] (positions 0..L-1)."""
    H, D = q.shape
    G = H // k.shape[1]
    lo = max(0, p - window + 1) if window > 0 else 0
    out = np.zeros((H, D), np.float64)
    for h in range(H):
        kk = k[lo : p + 1, h // G].astype(np.float64)
        vv = v[lo : p + 1, h // G].astype(np.float64)
        s = kk @ q[h].astype(np.float64) * D**-0.5
        e = np.exp(s - s.max())
        out[h] = (e / e.sum()) @ vv
    return out


@pytest.mark.parametrize(
    "PS,H,KVH,window,prefill",
    [(16, 9, 3, 0, 7), (8, 4, 4, 0, 7), (8, 6, 2, 5, 7), (16, 9, 3, 0, 128), (8, 4, 4, 37, 128)],
)
def test_paged_kv_attention(PS: int, H: int, KVH: int, window: int, prefill: int) -> None:
    D = 32 if H == 4 else 64
    rng = np.random.default_rng(PS + H + window + prefill)
    vm = _step_module(H, KVH, D, PS, window)
    lens = [prefill, max(1, prefill - 3)]  # prompt lengths per sequence
    total = [n + 1 for n in lens]  # + one decode token (129 for prefill=128)
    B, T = 2, prefill
    max_pages = (max(total) + PS - 1) // PS + 1
    num_pages = B * max_pages + 3
    perm = rng.permutation(num_pages).astype(np.int32)
    page_table = perm[: B * max_pages].reshape(B, max_pages).copy()  # shuffled, non-contiguous
    Q = [rng.standard_normal((n, H, D), dtype=np.float32) for n in total]
    K = [rng.standard_normal((n, KVH, D), dtype=np.float32) for n in total]
    V = [rng.standard_normal((n, KVH, D), dtype=np.float32) for n in total]
    cache = tvm.runtime.tensor(np.zeros((num_pages, 2, KVH, PS, D), np.float32))
    pt = tvm.runtime.tensor(page_table)

    # prefill: sequence 1 is shorter -> right padding with position -1
    q = np.zeros((B, T, H, D), np.float32)
    k = np.zeros((B, T, KVH, D), np.float32)
    v = np.zeros((B, T, KVH, D), np.float32)
    pos = np.full((B, T), -1, np.int32)
    for i, n in enumerate(lens):
        q[i, :n], k[i, :n], v[i, :n], pos[i, :n] = Q[i][:n], K[i][:n], V[i][:n], np.arange(n)
    out = vm["step"](*[tvm.runtime.tensor(a) for a in (q, k, v)], cache, pt, tvm.runtime.tensor(pos)).numpy()
    for i, n in enumerate(lens):
        for p in range(n):
            np.testing.assert_allclose(out[i, p], _ref_attention(Q[i][p], K[i], V[i], p, window), rtol=1e-4, atol=1e-4)
        assert np.all(out[i, n:] == 0), "padding queries must produce zeros"

    # cache was mutated in place: keys of the prefill are in the pages
    c = cache.numpy()
    for i, n in enumerate(lens):
        for p in (0, n - 1):
            np.testing.assert_array_equal(c[page_table[i, p // PS], 0, :, p % PS], K[i][p])
            np.testing.assert_array_equal(c[page_table[i, p // PS], 1, :, p % PS], V[i][p])

    # decode one token per sequence; attention must see the prefill keys from the same cache tensor
    dq = np.stack([Q[i][n][None] for i, n in enumerate(lens)])
    dk = np.stack([K[i][n][None] for i, n in enumerate(lens)])
    dv = np.stack([V[i][n][None] for i, n in enumerate(lens)])
    dpos = np.array([[n] for n in lens], np.int32)
    out = vm["step"](*[tvm.runtime.tensor(a) for a in (dq, dk, dv)], cache, pt, tvm.runtime.tensor(dpos)).numpy()
    for i, n in enumerate(lens):
        np.testing.assert_allclose(out[i, 0], _ref_attention(Q[i][n], K[i], V[i], n, window), rtol=1e-4, atol=1e-4)
