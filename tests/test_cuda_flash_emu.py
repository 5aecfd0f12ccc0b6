"""The cuda target's fused prefill attention (targets/cuda/flash.py), its device code run on the CPU under the
warp emulation of tests/cuda_emu.h: fragment layouts, the swizzle, paged reads, masks and the online softmax
against a float64 reference; and, where nvcc is installed, ptxas on the kernel TVM emits (no spills). GPU runs of
the same kernel are in tests/test_cuda.py (marked gpu)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CXX = shutil.which("g++")
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def reference(q, cache, pt, pos, rep, page, scale, window):
    """o[B, H, T, D] in float64: q rounded to fp16 as the kernel does, keys gathered from the pages."""
    b_, h_, t_, d = q.shape
    q16 = q.astype(np.float16).astype(np.float64)
    o = np.zeros(q.shape)
    for b in range(b_):
        for t in range(t_):
            p = int(pos[b, t])
            if p < 0:
                continue
            js = np.arange(max(p - window + 1, 0) if window else 0, p + 1)
            pages, slots = pt[b, js // page], js % page
            for h in range(h_):
                hk = h // rep
                k = cache[pages, 0, hk, slots].astype(np.float64)
                v = cache[pages, 1, hk, slots].astype(np.float64)
                s = k @ q16[b, h, t] * scale
                w = np.exp(s - s.max())
                o[b, h, t] = (w / w.sum()) @ v
    return o


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    pytest.importorskip("tvm")
    from kiln.targets.cuda.flash import SRC

    d = tmp_path_factory.mktemp("flash_emu")
    (d / "flash.cuh").write_text(SRC)
    return d


def run_emulated(src_dir, tmp, q, cache, pt, pos, rep, kv_heads, page, scale, window):
    from kiln.targets.cuda.flash import smem_bytes

    d = q.shape[-1]
    exe = tmp / "flash_emu"
    subprocess.run(
        [CXX, "-std=c++20", "-O2", "-pthread", f"-I{HERE}", f"-DKILN_KERNEL_SOURCE=\"{src_dir / 'flash.cuh'}\"",
         f"-DKD={d}", f"-DKREP={rep}", f"-DKKVH={kv_heads}", f"-DKPAGE={page}", f"-DKWIN={window}",
         f"-DKSMEM={smem_bytes(d)}",
         os.path.join(HERE, "cuda_flash_emu.cpp"), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    q.astype(np.float32).tofile(tmp / "q.bin")
    cache.astype(np.float16).tofile(tmp / "cache.bin")
    pt.astype(np.int32).tofile(tmp / "pt.bin")
    pos.astype(np.int32).tofile(tmp / "pos.bin")
    b, _, t, _ = q.shape
    subprocess.run(
        [str(exe), str(tmp), str(b), str(t), str(cache.shape[0]), str(pt.shape[1]), repr(scale * math.log2(math.e))],
        check=True,
        timeout=600,
    )
    return np.fromfile(tmp / "o.bin", dtype=np.float32).reshape(q.shape)


# A block is 128 rows (4 warps x 32) of (token, head-of-group) pairs. What each case reaches besides the
# common path: tiles every row of a warp sees whole (no mask), at head_dim 128 in two 32-key softmax steps;
# warps that skip the block's last tile or a step of it; blocks split by the end of the rows; padding rows.
CASES = {
    # name: (head_dim, rep, kv_heads, page, window, starts, valid tokens, tokens)
    "gqa-chunk-after-prefix": (64, 3, 2, 16, 0, (37, 5), (40, 29), 40),
    "d128-window": (128, 4, 1, 16, 24, (0,), (70,), 70),
    "mqa-short-verify": (64, 8, 1, 16, 0, (90, 3), (5, 5), 5),
    # 160 rows: the second block's last 3 warps have none; the prefix makes 2 tiles unmasked for every warp
    "d128-gqa4-long-prefix": (128, 4, 2, 16, 0, (150, 0), (40, 33), 40),
    # one head per KV head: a warp is 32 tokens, so warps 0-1 skip a tile (and d128 a 32-key step) of warps 2-3
    "d128-mha-causal": (128, 1, 2, 8, 0, (0, 21), (150, 97), 150),
    # window 128 and a warp of 32 tokens: the tile 128-191 is whole for every row (no mask), 64-127 is not;
    # pages of 8 keys, fewer than the 16 rows one pass of the block's copy covers at head_dim 64
    "mha-window-unmasked-tile": (64, 1, 2, 8, 128, (200,), (30,), 30),
    # pages of 24 keys: a 64-key tile starts and ends inside pages
    "d128-mqa8-window": (128, 8, 1, 24, 70, (20,), (50,), 50),
}


@pytest.mark.skipif(CXX is None, reason="needs g++ for the CPU emulation of the device code")
@pytest.mark.parametrize("case", sorted(CASES))
def test_flash_prefill_device_code_matches_reference(case, source, tmp_path):
    d, rep, kvh, page, window, starts, valid, t = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    b = len(starts)
    mp = max(-(-(s + t) // page) for s in starts)
    pages = b * mp + 3
    # every sequence's pages scattered over the pool: the kernel must follow the table
    pt = rng.permutation(pages)[: b * mp].reshape(b, mp)
    cache = rng.standard_normal((pages, 2, kvh, page, d)).astype(np.float16)
    pos = np.full((b, t), -1, dtype=np.int64)
    for i, (s, n) in enumerate(zip(starts, valid)):
        pos[i, :n] = np.arange(s, s + n)  # the rest: padding rows
    q = rng.standard_normal((b, rep * kvh, t, d)) * 0.5
    scale = d**-0.5
    got = run_emulated(source, tmp_path, q, cache, pt, pos, rep, kvh, page, scale, window)
    want = reference(q, cache, pt, pos, rep, page, scale, window)
    # P enters the second product as fp16: errors of a few 1e-3 at outputs of size ~0.3
    np.testing.assert_allclose(got, want, atol=6e-3, rtol=2e-2)
    assert np.all(got[np.broadcast_to((pos < 0)[:, None, :, None], got.shape)] == 0)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (no GPU) to run ptxas on the kernel TVM emits")
@pytest.mark.parametrize("head_dim,rep,window", [(128, 4, 0), (64, 8, 32)])
def test_flash_kernel_fits_the_registers_without_spilling(head_dim, rep, window, tmp_path):
    """ptxas on the kernel as TVM emits it: no spills (a spill in the inner loop costs more than the 32-row
    tiles gain; the kernel sits near the 255-register limit at head_dim 128), shared memory dynamic, and
    registers for 2 blocks an SM."""
    tvm = pytest.importorskip("tvm")
    from kiln.targets.cuda.flash import THREADS, flash_func
    from kiln.targets.cuda.target import CudaTarget

    f = flash_func(rep * 8, 8, head_dim, 16, head_dim**-0.5, window).with_attr("global_symbol", "flash")
    mod = CudaTarget().compile_module(tvm.IRModule({"flash": f})).mod
    src = next(m.inspect_source("cuda") for m in mod.imports if m.kind == "cuda")
    assert "extern __shared__" in src and "kiln_flash<" in src
    (tmp_path / "flash.cu").write_text(src)
    r = subprocess.run(
        [NVCC, "-arch=sm_90a", "-cubin", "-Xptxas", "-v", "flash.cu", "-o", "flash.cubin"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", r.stderr), r.stderr
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    # registers are allocated 8 a thread at a time from the SM's 64K
    assert 2 * THREADS * (-(-regs // 8) * 8) <= 65536, regs
