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
# Scratch buffers are scope="global" and < 1 KiB: LowerTVMBuiltin keeps exactly those as
# stack allocas (LLVM then promotes them to registers); anything else (scope "local",
# >= 1 KiB, and plain `x = expr` scalars in TVMScript) becomes a heap workspace call.


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
        ntile = T.Bind((m + rows - 1) // rows)
        ngrp = T.Bind((ntile + tg - 1) // tg)
        for task in T.parallel(ngrp * nblk):
            g = T.Bind(task // nblk)
            nb = T.Bind(task % nblk)
            for tt in range(T.min(T.int64(tg), ntile - g * tg)):
                i0 = T.Bind((g * tg + tt) * rows)
                # two [rows, 16] halves: each < 1 KiB so it stays a stack alloca -> registers
                a0 = T.alloc_buffer((rows, 16), "float32", scope="global")  # lanes 0..15
                a1 = T.alloc_buffer((rows, 16), "float32", scope="global")  # lanes 16..31
                for r in T.unroll(rows):
                    for j in T.vectorized(16):
                        a0[r, j] = T.float32(0)
                        a1[r, j] = T.float32(0)
                for kk in range(k):
                    for r in T.unroll(rows):
                        for j in T.vectorized(16):
                            a0[r, j] = a0[r, j] + x[T.min(i0 + r, m - 1), kk] * w[nb, kk, j]
                            a1[r, j] = a1[r, j] + x[T.min(i0 + r, m - 1), kk] * w[nb, kk, 16 + j]
                for r in T.unroll(rows):
                    if i0 + r < m:
                        if nb < nfull:
                            for j in T.vectorized(16):
                                if bias is not None:
                                    out[i0 + r, nb * NB + j] = a0[r, j] + bias[nb * NB + j]
                                    out[i0 + r, nb * NB + 16 + j] = a1[r, j] + bias[nb * NB + 16 + j]
                                else:
                                    out[i0 + r, nb * NB + j] = a0[r, j]
                                    out[i0 + r, nb * NB + 16 + j] = a1[r, j]
                        else:
                            for j in range(16):
                                for h in range(2):
                                    if nb * NB + h * 16 + j < n:
                                        if bias is not None:
                                            out[i0 + r, nb * NB + h * 16 + j] = T.if_then_else(
                                                h == 0, a0[r, j], a1[r, j]) + bias[nb * NB + h * 16 + j]
                                        else:
                                            out[i0 + r, nb * NB + h * 16 + j] = T.if_then_else(
                                                h == 0, a0[r, j], a1[r, j])

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


# --------------------------------------------------------------------------- paged KV cache


def kv_append_func(kv_heads: int, head_dim: int, page_size: int) -> tvm.tirx.PrimFunc:
    """In-place paged KV append (use with relax.op.call_tir_inplace, inplace_indices=0).

    Signature: (cache [num_pages, 2, kv_heads, page_size, head_dim] f32,
    k [b, t, kv_heads, head_dim] f32, v [same], page_table [b, max_pages] i32, positions [b, t] i32).
    cache[page_table[bi, p // page_size], 0|1, h, p % page_size, :] = k|v[bi, ti, h, :],
    p = positions[bi, ti]; p < 0 (padding) is skipped.
    """
    KVH, D, PS = kv_heads, head_dim, page_size

    @T.prim_func
    def kv_append(c_h: T.handle, k_h: T.handle, v_h: T.handle, pt_h: T.handle, pos_h: T.handle):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(c_h, (num_pages, 2, KVH, PS, D), "float32")
        k = T.match_buffer(k_h, (b, t, KVH, D), "float32")  # k: [b, t, kvh, D]
        v = T.match_buffer(v_h, (b, t, KVH, D), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        for task in T.parallel(b * t):
            bi = T.Bind(task // t)
            ti = T.Bind(task % t)
            p = T.Bind(T.Cast("int64", positions[bi, ti]))
            if p >= 0:
                page = T.Bind(T.Cast("int64", page_table[bi, p // PS]))
                for h in range(KVH):
                    for d in T.vectorized(D):
                        cache[page, 0, h, p % PS, d] = k[bi, ti, h, d]
                        cache[page, 1, h, p % PS, d] = v[bi, ti, h, d]

    return kv_append


def paged_attention_func(num_heads: int, kv_heads: int, head_dim: int, page_size: int,
                         scale: float, window: int = 0, alibi: bool = False) -> tvm.tirx.PrimFunc:
    """Causal paged attention with streaming (online) softmax, GQA, optional sliding window and ALiBi.

    Signature: (q [b, t, num_heads, head_dim] f32, cache [num_pages, 2, kv_heads, page_size, head_dim] f32,
    page_table [b, max_pages] i32, positions [b, t] i32, [slopes [num_heads] f32 if alibi],
    out [b, t, num_heads, head_dim] f32).
    Query (bi, ti, h) at p = positions[bi, ti] attends to cached j in [lo, p],
    lo = max(0, p - window + 1) if window > 0 else 0, kv head h // (num_heads // kv_heads);
    with alibi the score of key j gains slopes[h] * (j - p). p < 0 -> zeros.
    Parallel over b*t*num_heads, one page (page_size keys) per softmax tile: the working set is
    O(head_dim + page_size) per task whatever the sequence length (no tokens x tokens scores).
    """
    H, KVH, D, PS = num_heads, kv_heads, head_dim, page_size
    G = H // KVH
    assert H % KVH == 0, "num_heads must be a multiple of kv_heads"
    VL = 16 if D % 16 == 0 else (8 if D % 8 == 0 else 1)  # dot-product vector lanes
    ND = D // VL
    W = int(window)
    scale = float(scale)

    @T.macro
    def body(q, cache, page_table, positions, slopes, out, b, t):
        for task in T.parallel(b * t * H):
            # interleave rows so static chunking pairs short (early) and long (late) queries
            row = T.Bind(task // H)
            rr = T.Bind(T.if_then_else(row % 2 == 0, row // 2, b * t - 1 - row // 2))
            bi = T.Bind(rr // t)
            ti = T.Bind(rr % t)
            h = T.Bind(task % H)
            kvh = T.Bind(h // G)
            p = T.Bind(T.Cast("int64", positions[bi, ti]))
            if p < 0:
                for d in T.vectorized(D):
                    out[bi, ti, h, d] = T.float32(0)
            else:
                lo = T.Bind(T.max(p - W + 1, T.int64(0)) if W > 0 else T.int64(0))
                qs = T.alloc_buffer((D,), "float32", scope="global")  # scaled q
                acc = T.alloc_buffer((D,), "float32", scope="global")  # sum softmax * v
                s = T.alloc_buffer((PS,), "float32", scope="global")  # scores of one page
                tmp = T.alloc_buffer((VL,), "float32", scope="global")
                st = T.alloc_buffer((3,), "float32", scope="global")  # running max, denom, tile max
                for d in T.vectorized(D):
                    qs[d] = q[bi, ti, h, d] * T.float32(scale)
                    acc[d] = T.float32(0)
                st[0] = T.float32(_NEG)
                st[1] = T.float32(0)
                for pg in range(lo // PS, p // PS + 1):
                    page = T.Bind(T.Cast("int64", page_table[bi, pg]))
                    st[2] = T.float32(_NEG)
                    for jj in range(PS):
                        s[jj] = T.float32(_NEG)
                        if pg * PS + jj >= lo and pg * PS + jj <= p:
                            for v in T.vectorized(VL):
                                tmp[v] = T.float32(0)
                            for d0 in range(ND):
                                for v in T.vectorized(VL):
                                    tmp[v] = tmp[v] + qs[d0 * VL + v] * cache[page, 0, kvh, jj, d0 * VL + v]
                            for v in range(VL):
                                s[jj] = T.if_then_else(v == 0, tmp[0], s[jj] + tmp[v])
                            if slopes is not None:
                                s[jj] = s[jj] + slopes[h] * T.Cast("float32", pg * PS + jj - p)
                            st[2] = T.max(st[2], s[jj])
                    m_new = T.Bind(T.max(st[0], st[2]))
                    corr = T.Bind(T.exp(st[0] - m_new))
                    st[1] = st[1] * corr
                    for d in T.vectorized(D):
                        acc[d] = acc[d] * corr
                    for jj in range(PS):
                        if pg * PS + jj >= lo and pg * PS + jj <= p:
                            e = T.Bind(T.exp(s[jj] - m_new))
                            st[1] = st[1] + e
                            for d in T.vectorized(D):
                                acc[d] = acc[d] + e * cache[page, 1, kvh, jj, d]
                    st[0] = m_new
                inv = T.Bind(T.float32(1) / st[1])
                for d in T.vectorized(D):
                    out[bi, ti, h, d] = acc[d] * inv

    if alibi:
        @T.prim_func
        def paged_attention_alibi(q_h: T.handle, c_h: T.handle, pt_h: T.handle, pos_h: T.handle,
                                  slopes: T.Buffer((H,), "float32"), o_h: T.handle):
            T.func_attr({"tir.noalias": True})
            b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, (b, t, H, D), "float32")  # q: [b, t, H, D]
            cache = T.match_buffer(c_h, (num_pages, 2, KVH, PS, D), "float32")
            page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
            positions = T.match_buffer(pos_h, (b, t), "int32")
            out = T.match_buffer(o_h, (b, t, H, D), "float32")  # out: [b, t, H, D]
            body(q, cache, page_table, positions, slopes, out, b, t)

        return paged_attention_alibi

    @T.prim_func
    def paged_attention(q_h: T.handle, c_h: T.handle, pt_h: T.handle, pos_h: T.handle, o_h: T.handle):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, t, H, D), "float32")  # q: [b, t, H, D]
        cache = T.match_buffer(c_h, (num_pages, 2, KVH, PS, D), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        out = T.match_buffer(o_h, (b, t, H, D), "float32")  # out: [b, t, H, D]
        body(q, cache, page_table, positions, None, out, b, t)

    return paged_attention
