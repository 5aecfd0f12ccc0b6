"""The cuda target's token draws on the device (targets/cuda/sample.py): its device code run on the CPU under the
warp emulation of tests/cuda_emu.h against the numpy reference (argmax with numpy's tie rule, all -inf and NaN
rows, Gumbel-max draws), and the draws' distribution against softmax(logits / T). GPU runs through a whole
engine are in tests/test_cuda.py (marked gpu)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CXX = shutil.which("g++")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    pytest.importorskip("tvm")
    from kiln.targets.cuda.sample import SRC

    d = tmp_path_factory.mktemp("sample_emu")
    (d / "sample.cuh").write_text(SRC)
    exes = {}
    for nt in (64, 1024):
        exe = d / f"sample_emu_{nt}"
        subprocess.run(
            [CXX, "-std=c++20", "-O2", "-pthread", f"-I{HERE}", f"-DKILN_KERNEL_SOURCE=\"{d / 'sample.cuh'}\"",
             f"-DKNT={nt}", os.path.join(HERE, "cuda_sample_emu.cpp"), "-o", str(exe)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        exes[nt] = exe
    return exes


def run_emulated(exe, tmp, logits, temp, key):
    b, t, v = logits.shape
    logits.astype(np.float32).tofile(tmp / "logits.bin")
    temp.astype(np.float32).tofile(tmp / "temp.bin")
    key.astype(np.int32).tofile(tmp / "key.bin")
    subprocess.run([str(exe), str(tmp), str(b), str(t), str(v)], check=True, timeout=600)
    return np.fromfile(tmp / "tok.bin", dtype=np.int32)


@pytest.mark.skipif(CXX is None, reason="needs g++ for the CPU emulation of the device code")
@pytest.mark.parametrize("nt", [64, 1024])
def test_device_argmax_matches_numpy(nt, emulator, tmp_path):
    rng = np.random.default_rng(nt)
    v = 1000 + 37  # not a multiple of the block
    logits = rng.standard_normal((6, 2, v)).astype(np.float32)
    logits[0, -1, [5, 900]] = 50.0  # a tie: the first index wins
    logits[1, -1] = -np.inf  # nothing finite: token 0
    logits[2, -1, 17] = np.nan  # NaN never wins
    logits[2, -1, 400] = 9.0
    logits[3, 0, 3] = 99.0  # an earlier position is not read
    logits[4, -1, v - 1] = 7.0  # the last column
    got = run_emulated(emulator[nt], tmp_path, logits, np.zeros(6), np.arange(6))
    want = [int(np.argmax(r)) for r in logits[:, -1]]
    want[2] = 400
    assert got.tolist() == want
    assert got[0] == 5 and got[1] == 0


@pytest.mark.skipif(CXX is None, reason="needs g++ for the CPU emulation of the device code")
def test_device_gumbel_draws_match_the_reference(emulator, tmp_path):
    from cuda_sample_ref import gumbel, reference

    rng = np.random.default_rng(1)
    b, v = 12, 3001
    logits = (rng.standard_normal((b, 1, v)) * 3).astype(np.float32)
    temp = np.array([0.7, 1.0, 1.5, 0.0] * 3, dtype=np.float32)
    key = rng.integers(-(2**31), 2**31 - 1, size=b).astype(np.int32)
    got = run_emulated(emulator[64], tmp_path, logits, temp, key)
    want = reference(logits, temp, key)
    for i in range(b):
        if got[i] != want[i]:  # float32 logf on the device against float64 here: only a near-tie may differ
            z = logits[i, 0].astype(np.float64) / temp[i] + gumbel(int(key[i]), v)
            assert z[got[i]] >= z.max() - 1e-4, (i, got[i], want[i])
    assert (got == want).mean() >= 0.9
    # the draws depend on the key: the same logits under other keys give other tokens
    assert len(set(reference(np.repeat(logits[:1], 64, 0), np.ones(64), np.arange(64)).tolist())) > 8


def test_gumbel_max_draws_follow_softmax():
    """Across keys, argmax(logits / T + g) is distributed as softmax(logits / T): a chi-square test on 8 tokens."""
    from cuda_sample_ref import reference

    logits = np.log(np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.04, 0.01]))[None, None, :] * 1.3
    n, t = 20000, 1.3
    draws = reference(np.repeat(logits, n, 0), np.full(n, t), np.arange(n) * 7919 + 11)
    p = np.exp(logits[0, 0] / t)
    p /= p.sum()
    seen = np.bincount(draws, minlength=8)
    chi2 = float((((seen - n * p) ** 2) / (n * p)).sum())
    assert chi2 < 24.3, (seen, n * p)  # the 0.999 quantile of chi-square with 7 degrees of freedom
