"""Paged KV cache in int8 for the CPU: append (quantize in place) and attention (dequantize on read).

Layout per layer: codes `cache [pages, 2, kv_heads, page_size, head_dim]` int8 and scales
`scales [pages, 2, kv_heads, page_size]` float32: one symmetric scale per token and head,
s = max(absmax over head_dim, 1e-8) / 127, code = clamp(nearbyint(x / s), -127, 127) — the same
rounding as the IR's reference (`kv_fake_quant`). The attention kernel is the online-softmax loop of
attention_template.py reading codes as f32, with each key's scale folded into its score and each
value's scale into its softmax weight.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .attention_template import head_major_reader, paged_append_body, paged_attention_body
from .signature import drop_params


def _load_int8(kv, which, page, kvh, jj, d):
    # kv: (codes [pages, 2, kvh, page, D] i8, scales [pages, 2, kvh, page] f32)
    return T.Cast("float32", kv[0][page, which, kvh, jj, d])


def _token_scale(kv, which, page, kvh, jj):
    return kv[1][page, which, kvh, jj]


def kv_append_int8_func(kv_heads: int, head_dim: int, page_size: int) -> tvm.tirx.PrimFunc:
    """(cache int8, scales f32, k [b, t, kvh, D], v, page_table [b, P] i32, positions [b, t] i32);
    in place on cache and scales (call_tir_inplace with inplace_indices [0, 1])."""
    KVH, D, PS = kv_heads, head_dim, page_size

    @T.macro
    def write(src, kv, bi, ti, page, slot):
        k, v, cache, scales = src[0], src[1], kv[0], kv[1]
        am = T.alloc_buffer((2,), "float32", scope="global")  # absmax of the k row, of the v row
        for h in range(KVH):
            am[0] = T.float32(1e-8)
            am[1] = T.float32(1e-8)
            for d in range(D):
                am[0] = T.max(am[0], T.fabs(k[bi, ti, h, d]))
                am[1] = T.max(am[1], T.fabs(v[bi, ti, h, d]))
            sk = T.Bind(am[0] / T.float32(127))
            sv = T.Bind(am[1] / T.float32(127))
            scales[page, 0, h, slot] = sk
            scales[page, 1, h, slot] = sv
            for d in T.vectorized(D):
                cache[page, 0, h, slot, d] = T.Cast(
                    "int8", T.max(T.min(T.nearbyint(k[bi, ti, h, d] / sk), T.float32(127)), T.float32(-127))
                )
                cache[page, 1, h, slot, d] = T.Cast(
                    "int8", T.max(T.min(T.nearbyint(v[bi, ti, h, d] / sv), T.float32(127)), T.float32(-127))
                )

    body = paged_append_body(PS, write)

    @T.prim_func
    def kv_append_int8(c_h: T.handle, s_h: T.handle, k_h: T.handle, v_h: T.handle, pt_h: T.handle, pos_h: T.handle):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(c_h, (num_pages, 2, KVH, PS, D), "int8")
        scales = T.match_buffer(s_h, (num_pages, 2, KVH, PS), "float32")
        k = T.match_buffer(k_h, (b, t, KVH, D), "float32")
        v = T.match_buffer(v_h, (b, t, KVH, D), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        body((k, v), (cache, scales), page_table, positions, b, t)

    return kv_append_int8


def paged_attention_int8_func(
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    page_size: int,
    scale: float,
    window: int = 0,
    alibi: bool = False,
    softcap: float = 0.0,
) -> tvm.tirx.PrimFunc:
    """(q [b, t, H, D], cache int8, scales f32, page_table, positions, [slopes [H] if alibi],
    out [b, t, H, D]); semantics as `paged_attention_func` in kernels.py."""
    H, KVH, D, PS = num_heads, kv_heads, head_dim, page_size
    reader = head_major_reader(D, scale, _load_int8, _token_scale)
    body = paged_attention_body(H, KVH, PS, window, alibi, reader, softcap)

    # T.Buffer(shape, dtype) annotations are TVMScript, not Python types: mypy cannot read them
    @T.prim_func
    def paged_attention_int8(
        q_h: T.handle,
        c_h: T.handle,
        s_h: T.handle,
        pt_h: T.handle,
        pos_h: T.handle,
        slopes: T.Buffer((H,), "float32"),  # type: ignore[valid-type]
        o_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        b, t, num_pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, t, H, D), "float32")
        cache = T.match_buffer(c_h, (num_pages, 2, KVH, PS, D), "int8")
        scales = T.match_buffer(s_h, (num_pages, 2, KVH, PS), "float32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        out = T.match_buffer(o_h, (b, t, H, D), "float32")
        body(q, (cache, scales), page_table, positions, slopes, out, b, t)

    if alibi:
        return drop_params(paged_attention_int8, [], "paged_attention_int8_alibi")
    return drop_params(paged_attention_int8, ["slopes"], "paged_attention_int8")
