"""Attention ops and their reference implementations: `attention` (recognized by fuse-attention),
`sdpa` (torch's scaled_dot_product_attention as traced), `cached_attention` over a paged KV cache
(kv-cache), and multi-head latent attention (`mla_attention`, `cached_mla_attention`; convert-mla)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ir import TensorType
from .base import define


@dataclass(frozen=True)
class AttentionAttrs:
    scale: float
    causal: bool = True
    window: int = 0  # sliding window in keys (0: the whole prefix)
    kv_dtype: str | None = None  # int8 | fp8_e4m3: K/V as they come back from an 8-bit cache (quantize-kv)
    alibi: tuple | None = None  # ALiBi slopes, one per query head
    softcap: float = 0.0  # > 0: scores become softcap * tanh(scores / softcap) before masks and biases (Gemma-2)


@dataclass(frozen=True)
class SdpaAttrs:
    scale: float | None = None  # None: 1 / sqrt(head_dim), as torch
    causal: bool = False
    gqa: bool = False  # k/v may have fewer heads than q


@dataclass(frozen=True)
class CachedAttentionAttrs:
    scale: float
    window: int = 0
    kv_dtype: str | None = None
    alibi: tuple | None = None
    layer: int | None = None  # which layer's cache (kv-cache numbers them)
    softcap: float = 0.0


@dataclass(frozen=True)
class MlaAttentionAttrs:
    scale: float
    rank: int  # the latent's width
    window: int = 0
    alibi: tuple | None = None


@dataclass(frozen=True)
class CachedMlaAttentionAttrs(MlaAttentionAttrs):
    layer: int | None = None


def _attention_infer(inputs, attrs):
    q, v = inputs[0].type, inputs[2].type
    return TensorType(q.shape[:-1] + (v.shape[-1],), q.dtype)


def kv_fake_quant(x: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """The value K/V take after a round trip through an 8-bit cache: one scale per token and head
    (absmax over head_dim). x: [..., head_dim]."""
    if not dtype or dtype == "float32":
        return x
    amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-8)
    if dtype == "int8":
        s = amax / 127.0
        return torch.round(x / s).clamp(-127, 127) * s
    if dtype == "fp8_e4m3":
        s = amax / 448.0
        return (x / s).to(torch.float8_e4m3fn).float() * s
    raise ValueError(f"unknown KV cache dtype {dtype}")


def alibi_bias(slopes, i: torch.Tensor, j: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ALiBi (Press et al., 2022): score bias slope[h] * (j - i) for query position i and key position j.
    Bloom adds slope * j; the two differ by a constant per query row, which softmax ignores.
    Returns [H, len(i), len(j)]."""
    s = torch.as_tensor(slopes, dtype=dtype)
    return s[:, None, None] * (j[None, None, :] - i[None, :, None]).to(dtype)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = True,
    window: int = 0,
    mask: torch.Tensor | None = None,
    kv_dtype: str | None = None,
    alibi=None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q: [B, H, T, D], k/v: [B, Hkv, S, D] with H a multiple of Hkv (GQA); `alibi`: per-head slopes [H];
    `softcap` > 0 bounds the scaled scores to (-softcap, softcap) by tanh before masks and biases."""
    k, v = kv_fake_quant(k, kv_dtype), kv_fake_quant(v, kv_dtype)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    t, s = q.shape[-2], k.shape[-2]
    i = torch.arange(t) + (s - t)
    j = torch.arange(s)
    if mask is None and (causal or window):
        mask = j[None, :] <= i[:, None]
        if window:
            mask = mask & (j[None, :] > i[:, None] - window)
    if alibi is not None:
        bias = alibi_bias(alibi, i, j, q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    if softcap:  # sdpa has no softcap: scores written out, as the models do
        scores = softcap_scores(q @ k.transpose(-1, -2) * scale, softcap)
        if mask is not None:
            scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, -1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def softcap_scores(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """Gemma-2's attention logit softcapping: softcap * tanh(s / softcap); 0 leaves the scores alone."""
    return softcap * torch.tanh(s / softcap) if softcap else s


define(
    "attention",
    "attention",
    ("q", "k", "v"),
    AttentionAttrs,
    _attention_infer,
    lambda ctx, x, a: attention_reference(
        x[0],
        x[1],
        x[2],
        a["scale"],
        a["causal"],
        a["window"],
        kv_dtype=a["kv_dtype"],
        alibi=a["alibi"],
        softcap=a["softcap"],
    ),
    "softmax(softcap(q k^T * scale) + causal/window mask [+ ALiBi bias]) v; GQA by head groups",
)


def _sdpa_ref(ctx, x, a):
    q, k, v, mask = x
    if a["gqa"] and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a["causal"], scale=a["scale"])


define(
    "sdpa",
    "attention",
    ("q", "k", "v", "mask?"),
    SdpaAttrs,
    _attention_infer,
    _sdpa_ref,
    "torch's scaled_dot_product_attention with an explicit mask",
)


def cached_attention_reference(
    q,
    k,
    v,
    cache,
    page_table,
    positions,
    scales=None,
    scale: float = 1.0,
    window: int = 0,
    kv_dtype: str | None = None,
    alibi=None,
    softcap: float = 0.0,
):
    """Write k/v into the paged cache at `positions`, then attend each query over its cached prefix.

    q: [B, H, T, D]; k, v: [B, Hkv, T, D]; cache: [pages, 2, Hkv, page, D] (mutated in place);
    page_table: [B, max_pages]; positions: [B, T] (absolute; < 0 marks padding). An int8 cache comes
    with `scales [pages, 2, Hkv, page]` (one per token and head).
    """
    page = cache.shape[3]
    B, H, T, D = q.shape
    if scales is not None:  # int8 codes + scales: store quantized, read back dequantized
        amax = lambda x: x.abs().amax(-1).clamp_min(1e-8) / 127.0
        sk, sv = amax(k), amax(v)
        kq = torch.round(k / sk[..., None]).clamp(-127, 127)
        vq = torch.round(v / sv[..., None]).clamp(-127, 127)
        for b in range(B):
            for t in range(T):
                p = int(positions[b, t])
                if p >= 0:
                    pg = int(page_table[b, p // page])
                    cache[pg, 0, :, p % page] = kq[b, :, t].to(cache.dtype)
                    cache[pg, 1, :, p % page] = vq[b, :, t].to(cache.dtype)
                    scales[pg, 0, :, p % page] = sk[b, :, t]
                    scales[pg, 1, :, p % page] = sv[b, :, t]
        deq = cache.float() * scales[..., None]
        return cached_attention_reference(
            q,
            kq * sk[..., None],
            vq * sv[..., None],
            deq,
            page_table,
            positions,
            None,
            scale,
            window,
            alibi=alibi,
            softcap=softcap,
        )
    k, v = kv_fake_quant(k, kv_dtype), kv_fake_quant(v, kv_dtype)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    pos = positions.long()
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            if p < 0:
                continue
            pg = int(page_table[b, p // page])
            cache[pg, 0, :, p % page] = k[b, :, t]
            cache[pg, 1, :, p % page] = v[b, :, t]
    rep = H // k.shape[1]
    for b in range(B):
        n = _prefix_len(pos[b])
        if not n:
            continue
        idx = torch.arange(n)
        pages = page_table[b, idx // page].long()
        keys = cache[pages, 0, :, idx % page].permute(1, 0, 2)  # [Hkv, n, D]
        vals = cache[pages, 1, :, idx % page].permute(1, 0, 2)
        keys, vals = keys.repeat_interleave(rep, 0), vals.repeat_interleave(rep, 0)
        out[b] = _attend_prefix(q[b], keys, vals, pos[b], scale, window, alibi, softcap)
    return out


def _prefix_len(pos: torch.Tensor) -> int:
    """How many cached positions a sequence's queries (absolute positions `pos`, < 0 = padding) see."""
    valid = pos[pos >= 0]
    return int(valid.max()) + 1 if valid.numel() else 0


def _attend_prefix(q, keys, vals, pos, scale: float, window: int, alibi, softcap: float = 0.0) -> torch.Tensor:
    """One sequence's queries q [H, T, D] (at absolute positions `pos` [T], < 0 = padding) over its cached
    prefix keys/vals [H, n, D]: causal (+ sliding window, + ALiBi, + softcap); padding rows are zeros."""
    idx = torch.arange(keys.shape[1])
    s = softcap_scores(torch.einsum("htd,hnd->htn", q, keys) * scale, softcap)
    i, j = pos[:, None], idx[None, :]
    m = j <= i
    if window:
        m = m & (j > i - window)
    if alibi is not None:
        s = s + alibi_bias(alibi, pos, idx, s.dtype)
    s = s.masked_fill(~m[None], float("-inf"))
    o = torch.einsum("htn,hnd->htd", torch.softmax(s, -1), vals)
    return torch.where((pos >= 0)[None, :, None], o, torch.zeros_like(o))


def _cached_attention_ref(ctx, x, a):
    q, k, v, cache, page_table, positions, scales = x
    return cached_attention_reference(
        q, k, v, cache, page_table, positions, scales, a["scale"], a["window"], a["kv_dtype"], a["alibi"], a["softcap"]
    )


define(
    "cached_attention",
    "attention",
    ("q", "k", "v", "cache", "page_table", "positions", "scales?"),
    CachedAttentionAttrs,
    lambda i, a: TensorType(i[0].type.shape, i[0].type.dtype),
    _cached_attention_ref,
    "attention over a paged KV cache [pages, 2, kv_heads, page, head_dim]; an int8 cache comes with "
    "scales [pages, 2, kv_heads, page]",
)


def _mla_keys_values(c, k_rope, w_uk, w_uv):
    """Keys and values from a latent: c [B, S, r], k_rope [B, Hkv, S, R], w_uk [Hkv, Dn, r],
    w_uv [Hkv, Dv, r] -> k [B, Hkv, S, Dn + R] (latent part first), v [B, Hkv, S, Dv]."""
    k_nope = torch.einsum("bsr,gdr->bgsd", c, w_uk.to(c.dtype))
    v = torch.einsum("bsr,gdr->bgsd", c, w_uv.to(c.dtype))
    return torch.cat([k_nope, k_rope.to(c.dtype)], -1), v


def mla_attention_reference(
    q_nope, q_rope, c, k_rope, w_uk, w_uv, scale: float, window: int = 0, alibi=None
) -> torch.Tensor:
    """Multi-head latent attention (DeepSeek-AI, 2024) over a shared latent with a decoupled rotary key:
    q_nope [B, H, T, Dn], q_rope [B, H, T, R], c [B, T, r], k_rope [B, Hkv, T, R]. Causal."""
    k, v = _mla_keys_values(c, k_rope, w_uk, w_uv)
    return attention_reference(torch.cat([q_nope, q_rope], -1), k, v, scale, True, window, alibi=alibi)


def _mla_infer(inputs, attrs):
    q = inputs[0].type
    return TensorType(q.shape[:-1] + (inputs[5].type.shape[1],), q.dtype)


def _mla_attention_ref(ctx, x, a):
    q_nope, q_rope, c, k_rope, w_uk, w_uv = x
    return mla_attention_reference(q_nope, q_rope, c, k_rope, w_uk, w_uv, a["scale"], a["window"], a["alibi"])


define(
    "mla_attention",
    "attention",
    ("q_nope", "q_rope", "c", "k_rope", "w_uk", "w_uv"),
    MlaAttentionAttrs,
    _mla_infer,
    _mla_attention_ref,
    "attention with keys/values expanded from a latent c by w_uk/w_uv",
)


def cached_mla_attention_reference(
    q_nope, q_rope, c, k_rope, w_uk, w_uv, cache, page_table, positions, scale: float = 1.0, window: int = 0, alibi=None
):
    """Append each token's latent row [c | k_rope of every KV head] to the paged cache at `positions`
    (cache: [pages, page, r + Hkv * R], mutated in place), then attend each query over its cached
    prefix with keys/values expanded from the cached latents. Positions < 0 are padding (zeros)."""
    page = cache.shape[1]
    B, H, T, _ = q_nope.shape
    r = c.shape[-1]
    G, R = k_rope.shape[1], k_rope.shape[-1]
    rows = torch.cat([c, k_rope.permute(0, 2, 1, 3).reshape(B, T, G * R)], -1)  # [B, T, r + Hkv*R]
    pos = positions.long()
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            if p >= 0:
                cache[int(page_table[b, p // page]), p % page] = rows[b, t].to(cache.dtype)
    out = torch.zeros(B, H, T, w_uv.shape[1], dtype=q_nope.dtype)
    for b in range(B):
        n = _prefix_len(pos[b])
        if not n:
            continue
        idx = torch.arange(n)
        lat = cache[page_table[b, idx // page].long(), idx % page].to(q_nope.dtype)  # [n, r + Hkv*R]
        kr = lat[:, r:].reshape(n, G, R).permute(1, 0, 2)[None]
        k, v = _mla_keys_values(lat[None, :, :r], kr, w_uk, w_uv)
        k, v = k[0].repeat_interleave(H // G, 0), v[0].repeat_interleave(H // G, 0)
        out[b] = _attend_prefix(torch.cat([q_nope[b], q_rope[b]], -1), k, v, pos[b], scale, window, alibi)
    return out


def _cached_mla_attention_ref(ctx, x, a):
    q_nope, q_rope, c, k_rope, w_uk, w_uv, cache, page_table, positions = x
    return cached_mla_attention_reference(
        q_nope, q_rope, c, k_rope, w_uk, w_uv, cache, page_table, positions, a["scale"], a["window"], a["alibi"]
    )


define(
    "cached_mla_attention",
    "attention",
    ("q_nope", "q_rope", "c", "k_rope", "w_uk", "w_uv", "cache", "page_table", "positions"),
    CachedMlaAttentionAttrs,
    _mla_infer,
    _cached_mla_attention_ref,
    "mla_attention over a paged latent cache [pages, page, r + Hkv*R]",
)
