"""Paged latent attention (MLA) for the CPU: the cache holds one row per token, [c | k_rope of each KV head].

Decode absorbs the key up-projection into the query (q_lat = W_uk^T q_nope, one r-vector per head) and
the value up-projection into the output (out = W_uv o_lat), so the kernel attends in latent space:
score(j) = scale * (q_lat . c_j + q_rope . k_rope_j[g]) and o_lat = sum_j softmax_j c_j. The same kernel
serves prefill; the absorption costs r instead of head_dim per score there, which a prefill that
expands keys and values would avoid. The loop is attention_template.py's, with a reader of latent rows.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .attention_template import CacheReader, paged_append_body, paged_attention_body


def mla_append_func(width: int, page_size: int) -> tvm.tirx.PrimFunc:
    """In place (call_tir_inplace, index 0): cache [pages, page, width], rows [b, t, width],
    page_table [b, P] i32, positions [b, t] i32; cache[page_table[bi, p // page], p % page] = rows[bi, ti]."""
    L, PS = width, page_size

    @T.macro
    def write(rows, cache, bi, ti, page, slot):
        for d in T.vectorized(L):
            cache[page, slot, d] = rows[bi, ti, d]

    body = paged_append_body(PS, write)

    @T.prim_func
    def mla_append(c_h: T.handle, r_h: T.handle, pt_h: T.handle, pos_h: T.handle):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(c_h, (num_pages, PS, L), "float32")  # cache: [pages, page, r + Hkv*R]
        rows = T.match_buffer(r_h, (b, t, L), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        body(rows, cache, page_table, positions, b, t)

    return mla_append


def _latent_reader(rank: int, rope_dims: int, scale: float) -> CacheReader:
    """Score scale * (q_lat . c_j + q_rope . k_rope_j[kv head]); value c_j. q is (q_lat, q_rope)."""
    RK, RD = rank, rope_dims
    scale = float(scale)

    @T.macro
    def score(q, cache, qs, tmp, s, bi, ti, h, kvh, page, jj):
        off = T.Bind(RK + kvh * RD)  # this kv head's rotary key in the row
        s[jj] = T.float32(0)
        for d in range(RK):
            s[jj] = s[jj] + q[0][bi, ti, h, d] * cache[page, jj, d]
        for d in range(RD):
            s[jj] = s[jj] + q[1][bi, ti, h, d] * cache[page, jj, off + d]
        s[jj] = s[jj] * T.float32(scale)

    @T.macro
    def accumulate(cache, acc, e, kvh, page, jj):
        for d in T.vectorized(RK):
            acc[d] = acc[d] + e * cache[page, jj, d]

    return CacheReader(width=RK, score=score, accumulate=accumulate)


def paged_mla_attention_func(
    num_heads: int, kv_heads: int, rank: int, rope_dims: int, page_size: int, scale: float, window: int = 0
) -> tvm.tirx.PrimFunc:
    """(q_lat [b, t, H, r], q_rope [b, t, H, R], cache [pages, page, r + Hkv*R], page_table [b, P] i32,
    positions [b, t] i32, out [b, t, H, r]): causal (optionally windowed) attention in latent space;
    head h reads the rotary key of KV head h // (H / Hkv). p < 0 -> zeros."""
    H, KVH, RK, RD, PS = num_heads, kv_heads, rank, rope_dims, page_size
    L = RK + KVH * RD
    body = paged_attention_body(H, KVH, PS, window, False, _latent_reader(RK, RD, scale))

    @T.prim_func
    def paged_mla_attention(
        ql_h: T.handle, qr_h: T.handle, c_h: T.handle, pt_h: T.handle, pos_h: T.handle, o_h: T.handle
    ):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        q_lat = T.match_buffer(ql_h, (b, t, H, RK), "float32")  # q_lat: [b, t, H, r]
        q_rope = T.match_buffer(qr_h, (b, t, H, RD), "float32")  # q_rope: [b, t, H, R]
        cache = T.match_buffer(c_h, (num_pages, PS, L), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        out = T.match_buffer(o_h, (b, t, H, RK), "float32")  # out: [b, t, H, r] (latent)
        body((q_lat, q_rope), cache, page_table, positions, None, out, b, t)

    return paged_mla_attention
