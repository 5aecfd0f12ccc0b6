"""Rotary embedding and the KV-cache append of one decode step as one kernel.

The generic rules give a step of each attention layer three launches before the attention kernel (rotary
on q, rotary on k, the append of k and v to the paged cache), each a few microseconds over a few KB.
Here one block per (token, head) rotates its head's pairs (i, i + D/2) in registers: q heads write the
rotated q in the [B, T, H, D] order the decode attention kernel reads; k heads write the rotated key to
the cache as fp16, v heads copy the value.
"""

from __future__ import annotations

from tvm.script import tirx as T


def rope_append_func(heads: int, kv_heads: int, head_dim: int, page: int):
    """q_out, cache = rope(q), cache with rope(k) and v written at `positions` (< 0: padding, skipped).

    q [B, T, H, D], k and v [B, T, Hkv, D] (fp32), cos and sin [B, T, D] (the half-rotation convention:
    x * cos + cat(-x[D/2:], x[:D/2]) * sin)."""
    half = head_dim // 2
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")

    @T.prim_func(private=True)
    def rope_append(
        var_q: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_cos: T.handle,
        var_sin: T.handle,
        var_pt: T.handle,
        var_pos: T.handle,
        var_cache: T.handle,
        var_qo: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        B, Tn, P, MP = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (B, Tn, heads, head_dim), "float32")
        k = T.match_buffer(var_k, (B, Tn, kv_heads, head_dim), "float32")
        v = T.match_buffer(var_v, (B, Tn, kv_heads, head_dim), "float32")
        cos = T.match_buffer(var_cos, (B, Tn, head_dim), "float32")
        sin = T.match_buffer(var_sin, (B, Tn, head_dim), "float32")
        pt = T.match_buffer(var_pt, (B, MP), "int32")
        pos = T.match_buffer(var_pos, (B, Tn), "int32")
        cache = T.match_buffer(var_cache, (P, 2, kv_heads, page, head_dim), "float16")
        qo = T.match_buffer(var_qo, (B, Tn, heads, head_dim), "float32")
        for bt in T.thread_binding(B * Tn, thread="blockIdx.x"):
            for hh in T.thread_binding(heads + 2 * kv_heads, thread="blockIdx.y"):
                for i in T.thread_binding(half, thread="threadIdx.x"):
                    b = T.Bind(bt // Tn)
                    t = T.Bind(bt % Tn)
                    p = T.Bind(pos[b, t])
                    c0 = T.Bind(cos[b, t, i])
                    c1 = T.Bind(cos[b, t, i + half])
                    s0 = T.Bind(sin[b, t, i])
                    s1 = T.Bind(sin[b, t, i + half])
                    if hh < heads:
                        qo[b, t, hh, i] = q[b, t, hh, i] * c0 - q[b, t, hh, i + half] * s0
                        qo[b, t, hh, i + half] = q[b, t, hh, i + half] * c1 + q[b, t, hh, i] * s1
                    elif p >= 0:
                        pg = T.Bind(pt[b, p // page])
                        if hh < heads + kv_heads:
                            hk = T.Bind(hh - heads)
                            cache[pg, 0, hk, p % page, i] = T.Cast(
                                "float16", k[b, t, hk, i] * c0 - k[b, t, hk, i + half] * s0
                            )
                            cache[pg, 0, hk, p % page, i + half] = T.Cast(
                                "float16", k[b, t, hk, i + half] * c1 + k[b, t, hk, i] * s1
                            )
                        else:
                            hv = T.Bind(hh - heads - kv_heads)
                            cache[pg, 1, hv, p % page, i] = T.Cast("float16", v[b, t, hv, i])
                            cache[pg, 1, hv, p % page, i + half] = T.Cast("float16", v[b, t, hv, i + half])

    return rope_append
