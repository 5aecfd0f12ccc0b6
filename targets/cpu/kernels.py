"""Hand-scheduled CPU kernels (TVM TIR, AVX-512 friendly) for kiln.

Every public function returns an already-scheduled ``tvm.tirx.PrimFunc`` written
directly in TVMScript with explicit ``T.parallel`` / ``T.vectorized`` /
``T.unroll`` loops, ready for ``bb.add_func(func, name)`` and ``relax.call_tir``
(or ``relax.op.call_tir_inplace`` for :func:`kv_append_func`). The loops live in
gemm_template.py (linear, shared with the quantized kernels) and attention_template.py (paged
attention, shared with the int8 and latent caches); this module gives them the fp32 layouts.

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

from .attention_template import head_major_reader, paged_append_body, paged_attention_body
from .gemm_template import NB, linear_tiles, pack_blocks
from .signature import drop_params


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
    return pack_blocks(w, (w.shape[0] + NB - 1) // NB)


def linear_func(k: int, n: int, has_bias: bool, mode: str) -> tvm.tirx.PrimFunc:
    """out[m, n] = x[m, k] @ W.T (+ bias[n]); W given packed by pack_linear_weight.

    Signature: (x [m, k] f32, w_packed [ceil(n/NB), k, NB] f32, [bias [n] f32], out [m, n] f32),
    m symbolic int64.  mode="gemv" (decode, m small) or "gemm" (prefill, m large).
    """
    body = linear_tiles(k, n, has_bias, mode)
    nblk = (n + NB - 1) // NB

    # T.Buffer(shape, dtype) annotations are TVMScript, not Python types: mypy cannot read them
    @T.prim_func
    def linear(x_h: T.handle, w: T.Buffer((nblk, k, NB), "float32"), bias: T.Buffer((n,), "float32"), o_h: T.handle):  # type: ignore[valid-type]
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")  # x: [m, k]
        out = T.match_buffer(o_h, (m, n), "float32")  # out: [m, n]
        body(x, w, bias, out, m)

    return drop_params(linear, [], "linear_bias") if has_bias else drop_params(linear, ["bias"], "linear")


# --------------------------------------------------------------------------- paged KV cache


def _load_fp32(cache, which, page, kvh, jj, d):
    return cache[page, which, kvh, jj, d]


def kv_append_func(kv_heads: int, head_dim: int, page_size: int) -> tvm.tirx.PrimFunc:
    """In-place paged KV append (use with relax.op.call_tir_inplace, inplace_indices=0).

    Signature: (cache [num_pages, 2, kv_heads, page_size, head_dim] f32,
    k [b, t, kv_heads, head_dim] f32, v [same], page_table [b, max_pages] i32, positions [b, t] i32).
    cache[page_table[bi, p // page_size], 0|1, h, p % page_size, :] = k|v[bi, ti, h, :],
    p = positions[bi, ti]; p < 0 (padding) is skipped.
    """
    KVH, D, PS = kv_heads, head_dim, page_size

    @T.macro
    def write(src, cache, bi, ti, page, slot):
        for h in range(KVH):
            for d in T.vectorized(D):
                cache[page, 0, h, slot, d] = src[0][bi, ti, h, d]
                cache[page, 1, h, slot, d] = src[1][bi, ti, h, d]

    body = paged_append_body(PS, write)

    @T.prim_func
    def kv_append(c_h: T.handle, k_h: T.handle, v_h: T.handle, pt_h: T.handle, pos_h: T.handle):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(c_h, (num_pages, 2, KVH, PS, D), "float32")
        k = T.match_buffer(k_h, (b, t, KVH, D), "float32")  # k: [b, t, kvh, D]
        v = T.match_buffer(v_h, (b, t, KVH, D), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        body((k, v), cache, page_table, positions, b, t)

    return kv_append


def paged_attention_func(
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    page_size: int,
    scale: float,
    window: int = 0,
    alibi: bool = False,
    softcap: float = 0.0,
) -> tvm.tirx.PrimFunc:
    """Causal paged attention with streaming (online) softmax, GQA, optional sliding window and ALiBi.

    Signature: (q [b, t, num_heads, head_dim] f32, cache [num_pages, 2, kv_heads, page_size, head_dim] f32,
    page_table [b, max_pages] i32, positions [b, t] i32, [slopes [num_heads] f32 if alibi],
    out [b, t, num_heads, head_dim] f32).
    Query (bi, ti, h) at p = positions[bi, ti] attends to cached j in [lo, p],
    lo = max(0, p - window + 1) if window > 0 else 0, kv head h // (num_heads // kv_heads);
    with alibi the score of key j gains slopes[h] * (j - p); softcap > 0 caps the scaled score to
    softcap * tanh(s / softcap) before that. p < 0 -> zeros.
    The loop is :func:`attention_template.paged_attention_body`.
    """
    H, KVH, D, PS = num_heads, kv_heads, head_dim, page_size
    body = paged_attention_body(H, KVH, PS, window, alibi, head_major_reader(D, scale, _load_fp32), softcap)

    # T.Buffer(shape, dtype) annotations are TVMScript, not Python types: mypy cannot read them
    @T.prim_func
    def paged_attention(
        q_h: T.handle,
        c_h: T.handle,
        pt_h: T.handle,
        pos_h: T.handle,
        slopes: T.Buffer((H,), "float32"),  # type: ignore[valid-type]
        o_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, t, H, D), "float32")  # q: [b, t, H, D]
        cache = T.match_buffer(c_h, (num_pages, 2, KVH, PS, D), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        out = T.match_buffer(o_h, (b, t, H, D), "float32")  # out: [b, t, H, D]
        body(q, cache, page_table, positions, slopes, out, b, t)

    if alibi:
        return drop_params(paged_attention, [], "paged_attention_alibi")
    return drop_params(paged_attention, ["slopes"], "paged_attention")
