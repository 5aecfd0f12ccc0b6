"""The register-blocked tiling shared by the fp32 and the weight-only quantized linear kernels.

Both kernels compute ``out[m, n] = x[m, k] @ W.T (+ bias)`` with W stored in 32-lane output blocks
(``w[b, k, j] = W[b*NB + j, k]``, :func:`pack_blocks`). Parallel tasks are (a group of ``tg`` row
tiles) x (one block); a row tile is ``rows`` rows held in two [rows, 16] accumulators (one zmm each
per row), and the k loop broadcasts one x value per row against the block's 32 lanes. What differs
between the kernels is only how a weight block is read, so that is what :func:`linear_tiles` takes:

* nothing: the block is already fp32 in the packed array (``linear_func``);
* ``stage``: a macro that writes the block, as fp32, into a per-task workspace before the row tiles
  run (prefill: the dequantization is shared by every row of the task);
* ``k_loop``: a factory of macros that replace the k loop itself (decode: codes are dequantized on
  the fly, nothing is staged).

Scratch buffers are scope "global" and < 1 KiB so that LowerTVMBuiltin keeps them as stack allocas,
which LLVM then promotes to registers; anything else becomes a heap workspace call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tvm.script import tirx as T

NB = 32  # output lanes per packed weight block (2 x zmm of fp32)
GEMV_MR = 4  # rows register-blocked in decode mode (m > 1)
GEMM_MR = 8  # rows register-blocked in prefill mode
GEMM_TG = 8  # row tiles per parallel task in prefill mode (the x chunk stays in L2)
_ALL_TILES = 1 << 20  # decode: one task holds every row tile of its block


def pack_blocks(a: np.ndarray, nblk: int) -> np.ndarray:
    """[N, C] -> [nblk, C, NB], zero padded: out[b, c, j] = a[b*NB + j, c] (a block's lanes are contiguous)."""
    n, c = a.shape
    p = np.zeros((nblk * NB, c), a.dtype)
    p[:n] = a
    return np.ascontiguousarray(p.reshape(nblk, NB, c).transpose(0, 2, 1))


def linear_tiles(
    k: int, n: int, has_bias: bool, mode: str, stage: Any = None, k_loop: Callable[[int], Any] | None = None
) -> Any:
    """Macro ``body(x, w, bias, out, m)``: out = x @ W.T (+ bias) over packed weights ``w``.

    ``w`` is passed through untouched to ``stage`` / ``k_loop`` (a quantized kernel passes a tuple of
    its arrays); without them it is the fp32 array [ceil(n/NB), k, NB]. ``bias`` is read only when
    ``has_bias``. ``stage(w, wd, nb)`` fills ``wd`` [1, k, NB] f32 with block nb (used in "gemm" mode);
    ``k_loop(rows)`` returns a macro ``(x, w, a0, a1, m, i0, nb)`` that adds rows i0.. of x times block
    nb into the accumulators a0 (lanes 0..15) and a1 (lanes 16..31) (used in "gemv" mode).
    mode "gemv" (decode, m small; a single row gets its own 1-row tile) or "gemm" (prefill).
    """
    if mode not in ("gemv", "gemm"):
        raise ValueError(f"unknown linear mode {mode!r}")
    nblk = (n + NB - 1) // NB
    nfull = n // NB
    staged = stage is not None and mode == "gemm"

    @T.macro
    def fma_k(x, wb, sel, a0, a1, m, i0, rows):
        # the k loop over an fp32 block wb[sel]; rows clamped to m-1 (duplicates recomputed, never stored)
        for kk in range(k):
            for r in T.unroll(rows):
                for j in T.vectorized(16):
                    a0[r, j] = a0[r, j] + x[T.min(i0 + r, m - 1), kk] * wb[sel, kk, j]
                    a1[r, j] = a1[r, j] + x[T.min(i0 + r, m - 1), kk] * wb[sel, kk, 16 + j]

    @T.macro
    def store(a0, a1, bias, out, m, nb, i0, rows):
        for r in T.unroll(rows):
            if i0 + r < m:
                if nb < nfull:
                    for j in T.vectorized(16):
                        if has_bias:
                            out[i0 + r, nb * NB + j] = a0[r, j] + bias[nb * NB + j]
                            out[i0 + r, nb * NB + 16 + j] = a1[r, j] + bias[nb * NB + 16 + j]
                        else:
                            out[i0 + r, nb * NB + j] = a0[r, j]
                            out[i0 + r, nb * NB + 16 + j] = a1[r, j]
                else:  # the ragged last block: scalar stores, lanes past n skipped
                    for j in range(16):
                        for h in range(2):
                            if nb * NB + h * 16 + j < n:
                                if has_bias:
                                    out[i0 + r, nb * NB + h * 16 + j] = (
                                        T.if_then_else(h == 0, a0[r, j], a1[r, j]) + bias[nb * NB + h * 16 + j]
                                    )
                                else:
                                    out[i0 + r, nb * NB + h * 16 + j] = T.if_then_else(h == 0, a0[r, j], a1[r, j])

    def row_tiles(rows: int, tg: int) -> Any:
        custom = k_loop(rows) if k_loop is not None and mode == "gemv" else None

        @T.macro
        def tiles(x, w, bias, out, m):
            ntile = T.Bind((m + rows - 1) // rows)
            ngrp = T.Bind((ntile + tg - 1) // tg)
            for task in T.parallel(ngrp * nblk):
                g = T.Bind(task // nblk)
                nb = T.Bind(task % nblk)
                if staged:
                    # per-task fp32 copy of this block (>= 1 KiB: one workspace alloc per task, L2-resident)
                    wd = T.alloc_buffer((1, k, NB), "float32")
                    stage(w, wd, nb)
                for tt in range(T.min(T.int64(tg), ntile - g * tg)):
                    i0 = T.Bind((g * tg + tt) * rows)
                    # two [rows, 16] halves: each < 1 KiB so it stays a stack alloca -> registers
                    a0 = T.alloc_buffer((rows, 16), "float32", scope="global")  # lanes 0..15
                    a1 = T.alloc_buffer((rows, 16), "float32", scope="global")  # lanes 16..31
                    for r in T.unroll(rows):
                        for j in T.vectorized(16):
                            a0[r, j] = T.float32(0)
                            a1[r, j] = T.float32(0)
                    if custom is not None:
                        custom(x, w, a0, a1, m, i0, nb)
                    elif staged:
                        fma_k(x, wd, 0, a0, a1, m, i0, rows)
                    else:
                        fma_k(x, w, nb, a0, a1, m, i0, rows)
                    store(a0, a1, bias, out, m, nb, i0, rows)

        return tiles

    if mode == "gemm":
        return row_tiles(GEMM_MR, GEMM_TG)
    one_row, many_rows = row_tiles(1, _ALL_TILES), row_tiles(GEMV_MR, _ALL_TILES)

    @T.macro
    def body(x, w, bias, out, m):
        if m == 1:
            one_row(x, w, bias, out, m)
        else:
            many_rows(x, w, bias, out, m)

    return body
