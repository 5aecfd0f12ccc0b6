"""Benchmark kiln CPU kernels against numpy / torch.

Usage: .venv/bin/python bench/cpu_kernels.py [--quick]
Prints: shape, kiln time, reference time, GB/s (weight bytes) or GFLOP/s, ratio (ref/kiln).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np
import torch
import tvm

from kiln.targets.cpu import kernels as ck

TGT = ck.cpu_target()


def _timeit(fn, min_time: float = 0.3, min_iter: int = 5) -> float:
    for _ in range(3):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if n >= min_iter and el >= min_time:
            return el / n


def _settle() -> None:
    # let the other thread pool's spinning workers go to sleep (2 cores only)
    time.sleep(0.3)


def bench_linear(mode: str, m: int, k: int, n: int, ref: str) -> None:
    lib = tvm.compile(tvm.IRModule({"main": ck.linear_func(k, n, False, mode)}), target=TGT)
    f = lib["main"]
    W = np.random.randn(n, k).astype(np.float32)
    x = np.random.randn(m, k).astype(np.float32)
    xt, wt = tvm.runtime.tensor(x), tvm.runtime.tensor(ck.pack_linear_weight(W))
    ot = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    f(xt, wt, ot)
    np.testing.assert_allclose(ot.numpy(), x @ W.T, rtol=1e-3, atol=1e-3)
    _settle()
    tk = _timeit(lambda: f(xt, wt, ot))
    _settle()
    if ref == "numpy":
        tr = _timeit(lambda: x @ W.T)
    else:
        xx, ww = torch.from_numpy(x), torch.from_numpy(W)
        tr = _timeit(lambda: torch.nn.functional.linear(xx, ww))
    gbs = W.nbytes / tk / 1e9
    gfl = 2.0 * m * k * n / tk / 1e9
    print(
        f"linear-{mode:4s} m={m:<4d} k={k:<5d} n={n:<6d} kiln {tk * 1e6:9.1f} us  {ref:5s} {tr * 1e6:9.1f} us"
        f"  {gbs:6.1f} GB/s {gfl:6.1f} GFLOP/s  ratio(ref/kiln) {tr / tk:5.2f}"
    )


def bench_attention(b: int, t: int, ctx: int, H: int = 9, KVH: int = 3, D: int = 64, ps: int = 16) -> None:
    max_pages = (ctx + ps - 1) // ps
    num_pages = b * max_pages
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((num_pages, 2, KVH, ps, D), dtype=np.float32)
    pt = rng.permutation(num_pages).astype(np.int32).reshape(b, max_pages)
    pos = np.tile(np.arange(ctx - t, ctx, dtype=np.int32), (b, 1))
    q = rng.standard_normal((b, t, H, D), dtype=np.float32)
    f = tvm.compile(tvm.IRModule({"main": ck.paged_attention_func(H, KVH, D, ps, D**-0.5)}), target=TGT)["main"]
    args = [tvm.runtime.tensor(a) for a in (q, cache, pt, pos, np.zeros_like(q))]
    _settle()
    tk = _timeit(lambda: f(*args))
    # reference: torch SDPA on contiguous (already gathered) K/V
    kv = cache[pt.reshape(-1)].reshape(b, max_pages, 2, KVH, ps, D).transpose(0, 2, 3, 1, 4, 5)
    kv = torch.from_numpy(np.ascontiguousarray(kv.reshape(b, 2, KVH, max_pages * ps, D)[:, :, :, :ctx]))
    kk = kv[:, 0].repeat_interleave(H // KVH, 1)
    vv = kv[:, 1].repeat_interleave(H // KVH, 1)
    qq = torch.from_numpy(q).transpose(1, 2)
    mask = torch.from_numpy(pos[:, None, :, None] >= np.arange(ctx)[None, None, None, :])
    _settle()
    tr = _timeit(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask))
    flops = 4.0 * b * H * D * (t * ctx - t * (t - 1) / 2)
    print(
        f"attention b={b:<3d} t={t:<5d} ctx={ctx:<5d}       kiln {tk * 1e6:9.1f} us  torch {tr * 1e6:9.1f} us"
        f"  {'':6s}      {flops / tk / 1e9:6.1f} GFLOP/s  ratio(ref/kiln) {tr / tk:5.2f}"
    )


def main() -> None:
    torch.set_num_threads(int(os.environ["TVM_NUM_THREADS"]))
    print(f"TVM threads={tvm.runtime.num_threads()} torch threads={torch.get_num_threads()} target={TGT}")
    for m, k, n in [(1, 576, 49152), (1, 576, 1536), (1, 1536, 576), (4, 576, 1536), (16, 576, 1536)]:
        bench_linear("gemv", m, k, n, "numpy")
    for m, k, n in [(256, 576, 1536), (256, 1536, 576), (512, 576, 576)]:
        bench_linear("gemm", m, k, n, "torch")
    if "--quick" not in sys.argv:
        bench_attention(b=16, t=1, ctx=1024)
        bench_attention(b=1, t=1, ctx=4096)
        bench_attention(b=1, t=512, ctx=512)
        bench_attention(b=1, t=2048, ctx=2048)


if __name__ == "__main__":
    main()
