"""State-space ops: the selective scan (Mamba-1, and Mamba-2's scalar-A-per-head form) and the depthwise
causal convolution before it, in full-sequence form (what the tracer captures) and in cached form (what
kv-cache derives: one fixed-size recurrent state per sequence instead of a growing KV cache).

Layouts, tokens second so that `tokens` is the one symbolic axis that prefill and decode bind:
- selective_scan: x [B, T, H, P], dt [B, T, H], A [H, N] (Mamba-1, P = 1) or [H] (Mamba-2: one decay per
  head), B and C [B, T, G, N] (G groups, H % G == 0; head h reads group h // (H / G)), D [H], dt_bias [H],
  z [B, T, H, P]; output [B, T, H, P]; the recurrent state of a sequence is [H, P, N] (fp32).
- causal_conv1d: x [B, T, Ch], weight [Ch, W], bias [Ch]; output [B, T, Ch]; the state of a sequence is
  the last W - 1 inputs [W - 1, Ch].

A cached op finds its sequence's state slot as `slots[page_table[b, 0]]` (the slot the runtime gave the
sequence, looked up by the sequence's first page), starts from zeros at position 0, skips padding
(position < 0), and writes the state back in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.nn.functional as F

from ..ir import Node, TensorType
from .base import define, numel


@dataclass(frozen=True)
class SelectiveScanAttrs:
    softplus: bool = True  # dt = softplus(dt + dt_bias)
    dt_min: float = 0.0  # dt clamped to [dt_min, dt_max] after the softplus when either is set (Mamba-2's dt_limit)
    dt_max: float = 0.0  # 0: no upper bound


@dataclass(frozen=True)
class CausalConv1dAttrs:
    act: str = ""  # "" or "silu", applied after the bias


# -- reference semantics -----------------------------------------------------------------------------


def _discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, a: dict) -> torch.Tensor:
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if a["softplus"]:
        dt = F.softplus(dt)
    if a["dt_min"] > 0.0 or a["dt_max"] > 0.0:
        dt = dt.clamp(min=a["dt_min"], max=a["dt_max"] if a["dt_max"] > 0.0 else None)
    return dt


def scan_step(state, x, dt, A, B, C, D, z) -> torch.Tensor:
    """One token for a batch of sequences, state [S, H, P, N] updated in place; x [S, H, P], dt [S, H]
    (discretized), A [H, N] or [H], B, C [S, H, N] (already per head), D [H] or None, z [S, H, P] or None.
    Returns y [S, H, P]."""
    dA = torch.exp(dt[..., None] * (A.float() if A.dim() == 2 else A.float()[:, None]))  # [S, H, N or 1]
    dBx = dt[..., None, None] * x.float()[..., None] * B.float()[:, :, None, :]  # [S, H, P, N]
    state.mul_(dA[:, :, None, :]).add_(dBx)
    y = (state * C.float()[:, :, None, :]).sum(-1)  # [S, H, P]
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y


def _per_head(bc: torch.Tensor, heads: int) -> torch.Tensor:
    """B or C [..., G, N] -> [..., H, N]: head h reads group h // (H / G)."""
    return bc.repeat_interleave(heads // bc.shape[-2], dim=-2)


def selective_scan_reference(x, dt, A, B, C, D=None, dt_bias=None, z=None, attrs=None, state=None):
    """The full-sequence scan from a zero state (or `state` [B, H, P, N], updated in place); returns y."""
    a = {**SelectiveScanAttrs().__dict__, **(attrs or {})}
    b_, t_, h, p = x.shape
    n = B.shape[-1]
    st = state if state is not None else torch.zeros(b_, h, p, n)
    dt = _discretize_dt(dt, dt_bias, a)
    Bh, Ch = _per_head(B, h), _per_head(C, h)
    ys = [scan_step(st, x[:, t], dt[:, t], A, Bh[:, t], Ch[:, t], D, None if z is None else z[:, t]) for t in range(t_)]
    return torch.stack(ys, 1).to(x.dtype) if ys else torch.zeros_like(x)


def causal_conv1d_reference(x, weight, bias=None, act: str = "", window=None) -> torch.Tensor:
    """x [B, T, Ch] convolved causally with weight [Ch, W]; `window` [B, W - 1, Ch] are the inputs before
    x (zeros when None)."""
    b_, t_, ch = x.shape
    w = weight.shape[1]
    prev = window if window is not None else torch.zeros(b_, w - 1, ch, dtype=x.dtype)
    full = torch.cat([prev.to(x.dtype), x], 1)  # [B, W - 1 + T, Ch]
    y = sum(full[:, k : k + t_] * weight[:, k] for k in range(w))
    if bias is not None:
        y = y + bias
    return F.silu(y) if act == "silu" else y


def _live_tokens(state: torch.Tensor, slots: torch.Tensor, page_table: torch.Tensor, positions: torch.Tensor):
    """(row, token, state slot) of every token that is not padding, in order; a sequence's state row is
    cleared at its position 0 (a new sequence starts from zeros)."""
    for b in range(positions.shape[0]):
        s = int(slots[int(page_table[b, 0])])
        for t in range(positions.shape[1]):
            p = int(positions[b, t])
            if p < 0:
                continue
            if p == 0:
                state[s].zero_()
            yield b, t, s


def _cached_scan_ref(ctx, xs, a):
    x, dt, A, B, C, state, slots, page_table, positions, D, dt_bias, z = xs
    out = torch.zeros_like(x)
    h = x.shape[2]
    dtd = _discretize_dt(dt, dt_bias, a)
    Bh, Ch = _per_head(B, h), _per_head(C, h)
    for b, t, s in _live_tokens(state, slots, page_table, positions):
        st = state[s : s + 1]
        zt = None if z is None else z[b : b + 1, t]
        y = scan_step(st, x[b : b + 1, t], dtd[b : b + 1, t], A, Bh[b : b + 1, t], Ch[b : b + 1, t], D, zt)
        out[b, t] = y[0].to(x.dtype)
    return out


def _cached_conv_ref(ctx, xs, a):
    x, weight, state, slots, page_table, positions, bias = xs
    out = torch.zeros_like(x)
    for b, t, s in _live_tokens(state, slots, page_table, positions):
        win = torch.cat([state[s], x[b, t][None]], 0)  # [W, Ch]
        y = (win.t() * weight).sum(-1)
        if bias is not None:
            y = y + bias
        out[b, t] = F.silu(y) if a["act"] == "silu" else y
        state[s] = win[1:]
    return out


# -- records ---------------------------------------------------------------------------------------------


def _scan_flops(n: Node) -> sympy.Expr:
    x, B = n.inputs[0].type.shape, n.inputs[3].type.shape
    return 6 * numel(x) * B[-1]  # state update (2 mul + add) and the C readout (mul + add) per state element


def _conv_flops(n: Node) -> sympy.Expr:
    return 2 * numel(n.inputs[0].type.shape) * n.inputs[1].type.shape[1]


def _like_x(i, a) -> TensorType:
    return TensorType(i[0].type.shape, i[0].type.dtype)


define(
    "selective_scan",
    "recurrent",
    ("x", "dt", "A", "B", "C", "D?", "dt_bias?", "z?"),
    SelectiveScanAttrs,
    _like_x,
    lambda ctx, x, a: selective_scan_reference(x[0], x[1], x[2], x[3], x[4], D=x[5], dt_bias=x[6], z=x[7], attrs=a),
    "selective state-space scan from a zero state: h = exp(dt A) h + dt B x, y = C h + D x (* silu(z)); "
    "x [B, T, H, P], dt [B, T, H], A [H, N] or [H], B/C [B, T, G, N]",
    flops=_scan_flops,
)

define(
    "causal_conv1d",
    "recurrent",
    ("x", "weight", "bias?"),
    CausalConv1dAttrs,
    _like_x,
    lambda ctx, x, a: causal_conv1d_reference(x[0], x[1], x[2], a["act"]),
    "depthwise causal convolution over tokens, x [B, T, Ch], weight [Ch, W] (+ bias) (then silu)",
    flops=_conv_flops,
)

define(
    "cached_selective_scan",
    "recurrent",
    ("x", "dt", "A", "B", "C", "state", "slots", "page_table", "positions", "D?", "dt_bias?", "z?"),
    SelectiveScanAttrs,
    _like_x,
    _cached_scan_ref,
    "selective_scan continuing each sequence's state [slots, H, P, N] (updated in place); the slot is "
    "slots[page_table[b, 0]]; position 0 starts from zeros, positions < 0 are padding",
    flops=_scan_flops,
)

define(
    "cached_causal_conv1d",
    "recurrent",
    ("x", "weight", "state", "slots", "page_table", "positions", "bias?"),
    CausalConv1dAttrs,
    _like_x,
    _cached_conv_ref,
    "causal_conv1d continuing each sequence's last W - 1 inputs [slots, W - 1, Ch] (updated in place)",
    flops=_conv_flops,
)
