"""Hand-scheduled CPU kernels (TVM TIR, AVX-512 friendly) for kiln.

Every public function returns an already-scheduled ``tvm.tirx.PrimFunc`` written
directly in TVMScript with explicit ``T.parallel`` / ``T.vectorized`` /
``T.unroll`` loops, ready for ``bb.add_func(func, name)`` and ``relax.call_tir``
(or ``relax.op.call_tir_inplace`` for :func:`kv_append_func`).

Threads: TVM's CPU pool defaults to ``hardware_concurrency / 2`` (it assumes
SMT), i.e. ONE thread on a 2-core VM.  :func:`configure_threads` (called on
import) sets ``TVM_NUM_THREADS`` to the core count unless the user set it; it
must run before the first parallel kernel executes.
"""

from __future__ import annotations

import os

import numpy as np
import tvm
from tvm.script import tirx as T

NB = 32  # output lanes per packed weight block (2 x zmm of fp32)
_GEMV_MR = 4  # rows register-blocked in decode mode (m > 1)
_GEMM_MR = 8  # rows register-blocked in prefill mode
_GEMM_TG = 8  # row tiles per parallel task in prefill mode (x chunk stays in L2)
_NEG = -3.0e38
# keep small scratch as a stack alloca (LLVM promotes it to registers); without this,
# LowerTVMBuiltin turns every non-"global" (or >= 1 KiB) allocation into a heap workspace.
_STACK = {"disable_lower_builtin": True}


def configure_threads(n: int | None = None) -> None:
    """Set TVM_NUM_THREADS (default: number of usable cores) unless already set."""
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("TVM_NUM_THREADS", str(max(1, int(n or 1))))


configure_threads()


def cpu_target(mcpu: str = "znver4") -> tvm.target.Target:
    """LLVM x86-64 target with AVX-512 (znver4 = avx512f/bw/vl/vnni/bf16)."""
    return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": mcpu})


# --------------------------------------------------------------------------- linear


def linear_weight_layout() -> str:
    """Description of the packed Linear weight layout produced by pack_linear_weight."""
    return f"nk{NB}n: w_packed[ceil(N/{NB}), K, {NB}] f32, w_packed[b, k, j] = W[b*{NB}+j, k], zero-padded"


def pack_linear_weight(w: np.ndarray) -> np.ndarray:
    """Pack a torch-layout Linear weight w [N, K] into [ceil(N/NB), K, NB] (zero padded)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    nblk = (n + NB - 1) // NB
    wp = np.zeros((nblk * NB, k), dtype=np.float32)
    wp[:n] = w
    # [nblk, NB, K] -> [nblk, K, NB]
    return np.ascontiguousarray(wp.reshape(nblk, NB, k).transpose(0, 2, 1))


def _linear_body(k: int, n: int, mr: int, tg: int, single_row_fast_path: bool):
    """Macro computing out = x @ W.T (+ bias) over packed w; bias may be None."""
    nblk = (n + NB - 1) // NB
    nfull = n // NB

    @T.macro
    def row_tiles(x, w, bias, out, m, rows):
        # rows-row register tile, rows clamped to m-1 (duplicates recomputed, never stored)
        ntile = (m + rows - 1) // rows
        ngrp = (ntile + tg - 1) // tg
        for task in T.parallel(ngrp * nblk):
            g = task // nblk
            nb = task % nblk
            for tt in range(T.min(T.int64(tg), ntile - g * tg)):
                if True:
                    i0 = (g * tg + tt) * rows
                    acc = T.alloc_buffer((rows, NB), "float32", scope="local", annotations=_STACK)  # acc: [rows, NB]
                    for r in T.unroll(rows):
                        for j in T.vectorized(NB):
                            acc[r, j] = T.float32(0)
                    for kk in range(k):
                        for r in T.unroll(rows):
                            for j in T.vectorized(NB):
                                acc[r, j] = acc[r, j] + x[T.min(i0 + r, m - 1), kk] * w[nb, kk, j]
                    for r in T.unroll(rows):
                        if i0 + r < m:
                            if nb < nfull:
                                for j in T.vectorized(NB):
                                    if bias is not None:
                                        out[i0 + r, nb * NB + j] = acc[r, j] + bias[nb * NB + j]
                                    else:
                                        out[i0 + r, nb * NB + j] = acc[r, j]
                            else:
                                for j in range(NB):
                                    if nb * NB + j < n:
                                        if bias is not None:
                                            out[i0 + r, nb * NB + j] = acc[r, j] + bias[nb * NB + j]
                                        else:
                                            out[i0 + r, nb * NB + j] = acc[r, j]

    @T.macro
    def body(x, w, bias, out, m):
        if single_row_fast_path:
            if m == 1:
                row_tiles(x, w, bias, out, m, 1)
            else:
                row_tiles(x, w, bias, out, m, mr)
        else:
            row_tiles(x, w, bias, out, m, mr)

    return body, nblk


def linear_func(k: int, n: int, has_bias: bool, mode: str) -> tvm.tirx.PrimFunc:
    """out[m, n] = x[m, k] @ W.T (+ bias[n]); W given packed by pack_linear_weight.

    Signature: (x [m, k] f32, w_packed [ceil(n/NB), k, NB] f32, [bias [n] f32], out [m, n] f32),
    m symbolic int64.  mode="gemv" (decode, m small) or "gemm" (prefill, m large).
    """
    if mode == "gemv":
        body, nblk = _linear_body(k, n, _GEMV_MR, 1 << 20, True)
    elif mode == "gemm":
        body, nblk = _linear_body(k, n, _GEMM_MR, _GEMM_TG, False)
    else:
        raise ValueError(f"unknown linear mode {mode!r}")

    if has_bias:

        @T.prim_func
        def linear_bias(x_h: T.handle, w: T.Buffer((nblk, k, NB), "float32"),
                        bias: T.Buffer((n,), "float32"), o_h: T.handle):
            T.func_attr({"tir.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), "float32")  # x: [m, k]
            out = T.match_buffer(o_h, (m, n), "float32")  # out: [m, n]
            body(x, w, bias, out, m)

        return linear_bias

    @T.prim_func
    def linear(x_h: T.handle, w: T.Buffer((nblk, k, NB), "float32"), o_h: T.handle):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")  # x: [m, k]
        out = T.match_buffer(o_h, (m, n), "float32")  # out: [m, n]
        body(x, w, None, out, m)

    return linear
