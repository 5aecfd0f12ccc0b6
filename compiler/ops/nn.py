"""Network-level ops the recognizer passes create (layer_norm comes from the tracer): norms,
rotary position embedding and the gated MLP."""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.nn.functional as F

from ..ir import Node, TensorType
from .base import NoAttrs, broadcast_shapes, define, numel


@dataclass(frozen=True)
class RmsNormAttrs:
    eps: float
    weight_first: bool = True  # w * h, or h * w (same value; the order the model wrote)


@dataclass(frozen=True)
class LayerNormAttrs:
    eps: float
    ndim: int = 1  # how many trailing dims are normalized


@dataclass(frozen=True)
class GatedMlpAttrs:
    act: str  # silu | gelu | gelu_tanh


def _rms_norm_ref(ctx, x, a):
    v = x[0]
    h = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + a["eps"])
    return x[1] * h if a["weight_first"] else h * x[1]


define(
    "rms_norm",
    "norm",
    ("x", "weight"),
    RmsNormAttrs,
    lambda i, a: i[0].type,
    _rms_norm_ref,
    "x * rsqrt(mean(x^2) + eps) * w over the last dim",
)


def _layer_norm_ref(ctx, x, a):
    n = a["ndim"]
    return F.layer_norm(x[0], x[0].shape[-n:], x[1], x[2], a["eps"])


define(
    "layer_norm",
    "norm",
    ("x", "weight?", "bias?"),
    LayerNormAttrs,
    lambda i, a: i[0].type,
    _layer_norm_ref,
    "(x - mean) / sqrt(var + eps) (* weight) (+ bias) over the last `ndim` dims; a bias needs a weight",
)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


define(
    "rope",
    "position",
    ("x", "cos", "sin"),
    NoAttrs,
    lambda i, a: TensorType(broadcast_shapes(*[n.type.shape for n in i]), i[0].type.dtype),
    lambda ctx, x, a: x[0] * x[1] + rotate_half(x[0]) * x[2],
    "x * cos + rotate_half(x) * sin (cos/sin broadcast against x)",
)


def _gated_mlp_ref(ctx, x, a):
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[a["act"]]
    return F.linear(act(F.linear(x[0], x[1])) * F.linear(x[0], x[2]), x[3])


def _gated_mlp_flops(n: Node) -> sympy.Expr:
    w = n.inputs[1].type.shape
    return 6 * numel(n.inputs[0].type.shape[:-1]) * w[0] * w[1]


define(
    "gated_mlp",
    "matmul",
    ("x", "w_gate", "w_up", "w_down"),
    GatedMlpAttrs,
    lambda i, a: TensorType(i[0].type.shape[:-1] + (i[3].type.shape[0],), i[0].type.dtype),
    _gated_mlp_ref,
    "down(act(gate(x)) * up(x)); weights [ffn, d], [ffn, d], [d, ffn]",
    flops=_gated_mlp_flops,
)
