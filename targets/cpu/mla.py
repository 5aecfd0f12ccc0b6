"""Paged latent attention (MLA) for the CPU: the cache holds one row per token, [c | k_rope of each KV head].

Decode absorbs the key up-projection into the query (q_lat = W_uk^T q_nope, one r-vector per head) and
the value up-projection into the output (out = W_uv o_lat), so the kernel attends in latent space:
score(j) = scale * (q_lat . c_j + q_rope . k_rope_j[g]) and o_lat = sum_j softmax_j c_j. The same kernel
serves prefill; the absorption costs r instead of head_dim per score there, which a prefill that
expands keys and values would avoid. Online softmax over one page per tile, as `paged_attention_func`.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

_NEG = -3.0e38


def mla_append_func(width: int, page_size: int) -> tvm.tirx.PrimFunc:
    """In place (call_tir_inplace, index 0): cache [pages, page, width], rows [b, t, width],
    page_table [b, P] i32, positions [b, t] i32; cache[page_table[bi, p // page], p % page] = rows[bi, ti]."""
    L, PS = width, page_size

    @T.prim_func
    def mla_append(c_h: T.handle, r_h: T.handle, pt_h: T.handle, pos_h: T.handle):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(c_h, (num_pages, PS, L), "float32")  # cache: [pages, page, r + Hkv*R]
        rows = T.match_buffer(r_h, (b, t, L), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        for task in T.parallel(b * t):
            bi = T.Bind(task // t)
            ti = T.Bind(task % t)
            p = T.Bind(T.Cast("int64", positions[bi, ti]))
            if p >= 0:
                page = T.Bind(T.Cast("int64", page_table[bi, p // PS]))
                for d in T.vectorized(L):
                    cache[page, p % PS, d] = rows[bi, ti, d]

    return mla_append


def paged_mla_attention_func(num_heads: int, kv_heads: int, rank: int, rope_dims: int, page_size: int,
                             scale: float, window: int = 0) -> tvm.tirx.PrimFunc:
    """(q_lat [b, t, H, r], q_rope [b, t, H, R], cache [pages, page, r + Hkv*R], page_table [b, P] i32,
    positions [b, t] i32, out [b, t, H, r]): causal (optionally windowed) attention in latent space;
    head h reads the rotary key of KV head h // (H / Hkv). p < 0 -> zeros."""
    H, KVH, RK, RD, PS = num_heads, kv_heads, rank, rope_dims, page_size
    G = H // KVH
    L = RK + KVH * RD
    W = int(window)
    scale = float(scale)

    @T.prim_func
    def paged_mla_attention(ql_h: T.handle, qr_h: T.handle, c_h: T.handle, pt_h: T.handle, pos_h: T.handle,
                            o_h: T.handle):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        q_lat = T.match_buffer(ql_h, (b, t, H, RK), "float32")  # q_lat: [b, t, H, r]
        q_rope = T.match_buffer(qr_h, (b, t, H, RD), "float32")  # q_rope: [b, t, H, R]
        cache = T.match_buffer(c_h, (num_pages, PS, L), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        out = T.match_buffer(o_h, (b, t, H, RK), "float32")  # out: [b, t, H, r] (latent)
        for task in T.parallel(b * t * H):
            row = T.Bind(task // H)
            rr = T.Bind(T.if_then_else(row % 2 == 0, row // 2, b * t - 1 - row // 2))
            bi = T.Bind(rr // t)
            ti = T.Bind(rr % t)
            h = T.Bind(task % H)
            off = T.Bind(RK + (h // G) * RD)
            p = T.Bind(T.Cast("int64", positions[bi, ti]))
            if p < 0:
                for d in T.vectorized(RK):
                    out[bi, ti, h, d] = T.float32(0)
            else:
                lo = T.Bind(T.max(p - W + 1, T.int64(0)) if W > 0 else T.int64(0))
                acc = T.alloc_buffer((RK,), "float32", scope="global")
                s = T.alloc_buffer((PS,), "float32", scope="global")
                st = T.alloc_buffer((3,), "float32", scope="global")  # running max, denom, tile max
                for d in T.vectorized(RK):
                    acc[d] = T.float32(0)
                st[0] = T.float32(_NEG)
                st[1] = T.float32(0)
                for pg in range(lo // PS, p // PS + 1):
                    page = T.Bind(T.Cast("int64", page_table[bi, pg]))
                    st[2] = T.float32(_NEG)
                    for jj in range(PS):
                        s[jj] = T.float32(_NEG)
                        if pg * PS + jj >= lo and pg * PS + jj <= p:
                            s[jj] = T.float32(0)
                            for d in range(RK):
                                s[jj] = s[jj] + q_lat[bi, ti, h, d] * cache[page, jj, d]
                            for d in range(RD):
                                s[jj] = s[jj] + q_rope[bi, ti, h, d] * cache[page, jj, off + d]
                            s[jj] = s[jj] * T.float32(scale)
                            st[2] = T.max(st[2], s[jj])
                    m_new = T.Bind(T.max(st[0], st[2]))
                    corr = T.Bind(T.exp(st[0] - m_new))
                    st[1] = st[1] * corr
                    for d in T.vectorized(RK):
                        acc[d] = acc[d] * corr
                    for jj in range(PS):
                        if pg * PS + jj >= lo and pg * PS + jj <= p:
                            e = T.Bind(T.exp(s[jj] - m_new))
                            st[1] = st[1] + e
                            for d in T.vectorized(RK):
                                acc[d] = acc[d] + e * cache[page, jj, d]
                    st[0] = m_new
                inv = T.Bind(T.float32(1) / st[1])
                for d in T.vectorized(RK):
                    out[bi, ti, h, d] = acc[d] * inv

    return paged_mla_attention
