"""Paged KV cache in int8 for the CPU: append (quantize in place) and attention (dequantize on read).

Layout per layer: codes `cache [pages, 2, kv_heads, page_size, head_dim]` int8 and scales
`scales [pages, 2, kv_heads, page_size]` float32: one symmetric scale per token and head,
s = max(absmax over head_dim, 1e-8) / 127, code = clamp(nearbyint(x / s), -127, 127) — the same
rounding as the IR's reference (`kv_fake_quant`). The attention kernel follows `paged_attention_func`
in cpu_kernels.py (online softmax over one page per tile), folding each key's scale into its score
and each value's scale into its softmax weight.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

_NEG = -3.0e38


def kv_append_int8_func(kv_heads: int, head_dim: int, page_size: int) -> tvm.tirx.PrimFunc:
    """(cache int8, scales f32, k [b, t, kvh, D], v, page_table [b, P] i32, positions [b, t] i32);
    in place on cache and scales (call_tir_inplace with inplace_indices [0, 1])."""
    KVH, D, PS = kv_heads, head_dim, page_size

    @T.prim_func
    def kv_append_int8(c_h: T.handle, s_h: T.handle, k_h: T.handle, v_h: T.handle, pt_h: T.handle,
                       pos_h: T.handle):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(c_h, (num_pages, 2, KVH, PS, D), "int8")
        scales = T.match_buffer(s_h, (num_pages, 2, KVH, PS), "float32")
        k = T.match_buffer(k_h, (b, t, KVH, D), "float32")
        v = T.match_buffer(v_h, (b, t, KVH, D), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        for task in T.parallel(b * t):
            bi = T.Bind(task // t)
            ti = T.Bind(task % t)
            p = T.Bind(T.Cast("int64", positions[bi, ti]))
            if p >= 0:
                page = T.Bind(T.Cast("int64", page_table[bi, p // PS]))
                am = T.alloc_buffer((2,), "float32", scope="global")
                for h in range(KVH):
                    am[0] = T.float32(1e-8)
                    am[1] = T.float32(1e-8)
                    for d in range(D):
                        am[0] = T.max(am[0], T.fabs(k[bi, ti, h, d]))
                        am[1] = T.max(am[1], T.fabs(v[bi, ti, h, d]))
                    sk = T.Bind(am[0] / T.float32(127))
                    sv = T.Bind(am[1] / T.float32(127))
                    scales[page, 0, h, p % PS] = sk
                    scales[page, 1, h, p % PS] = sv
                    for d in T.vectorized(D):
                        cache[page, 0, h, p % PS, d] = T.Cast("int8", T.max(T.min(
                            T.nearbyint(k[bi, ti, h, d] / sk), T.float32(127)), T.float32(-127)))
                        cache[page, 1, h, p % PS, d] = T.Cast("int8", T.max(T.min(
                            T.nearbyint(v[bi, ti, h, d] / sv), T.float32(127)), T.float32(-127)))

    return kv_append_int8


def paged_attention_int8_func(num_heads: int, kv_heads: int, head_dim: int, page_size: int,
                              scale: float, window: int = 0, alibi: bool = False) -> tvm.tirx.PrimFunc:
    """(q [b, t, H, D], cache int8, scales f32, page_table, positions, [slopes [H] if alibi],
    out [b, t, H, D]); ALiBi as in `paged_attention_func`."""
    H, KVH, D, PS = num_heads, kv_heads, head_dim, page_size
    G = H // KVH
    VL = 16 if D % 16 == 0 else (8 if D % 8 == 0 else 1)
    ND = D // VL
    W = int(window)
    scale = float(scale)

    @T.macro
    def body(q, cache, scales, page_table, positions, slopes, out, b, t):
        for task in T.parallel(b * t * H):
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
                qs = T.alloc_buffer((D,), "float32", scope="global")
                acc = T.alloc_buffer((D,), "float32", scope="global")
                s = T.alloc_buffer((PS,), "float32", scope="global")
                tmp = T.alloc_buffer((VL,), "float32", scope="global")
                st = T.alloc_buffer((3,), "float32", scope="global")
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
                                    tmp[v] = tmp[v] + qs[d0 * VL + v] * T.Cast(
                                        "float32", cache[page, 0, kvh, jj, d0 * VL + v])
                            for v in range(VL):
                                s[jj] = T.if_then_else(v == 0, tmp[0], s[jj] + tmp[v])
                            s[jj] = s[jj] * scales[page, 0, kvh, jj]
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
                            ev = T.Bind(e * scales[page, 1, kvh, jj])
                            for d in T.vectorized(D):
                                acc[d] = acc[d] + ev * T.Cast("float32", cache[page, 1, kvh, jj, d])
                    st[0] = m_new
                inv = T.Bind(T.float32(1) / st[1])
                for d in T.vectorized(D):
                    out[bi, ti, h, d] = acc[d] * inv

    if alibi:
        @T.prim_func
        def paged_attention_int8_alibi(q_h: T.handle, c_h: T.handle, s_h: T.handle, pt_h: T.handle,
                                       pos_h: T.handle, slopes: T.Buffer((H,), "float32"), o_h: T.handle):
            T.func_attr({"tir.noalias": True})
            b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, (b, t, H, D), "float32")
            cache = T.match_buffer(c_h, (num_pages, 2, KVH, PS, D), "int8")
            scales = T.match_buffer(s_h, (num_pages, 2, KVH, PS), "float32")
            page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
            positions = T.match_buffer(pos_h, (b, t), "int32")
            out = T.match_buffer(o_h, (b, t, H, D), "float32")
            body(q, cache, scales, page_table, positions, slopes, out, b, t)

        return paged_attention_int8_alibi

    @T.prim_func
    def paged_attention_int8(q_h: T.handle, c_h: T.handle, s_h: T.handle, pt_h: T.handle, pos_h: T.handle,
                             o_h: T.handle):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, t, H, D), "float32")
        cache = T.match_buffer(c_h, (num_pages, 2, KVH, PS, D), "int8")
        scales = T.match_buffer(s_h, (num_pages, 2, KVH, PS), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        out = T.match_buffer(o_h, (b, t, H, D), "float32")
        body(q, cache, scales, page_table, positions, None, out, b, t)

    return paged_attention_int8
