"""The mixture-of-experts op: router logits -> softmax -> top-k -> (renormalized) weights -> the chosen
experts' gated MLPs -> their weighted sum. fuse-moe creates it from the traced experts layer.

Expert weights are stacked as transformers stores them: `w_gate_up [E, 2I, H]` (gate rows first) and
`w_down [E, H, I]`. Only the k chosen experts of each token are computed, by the reference and by
the CPU kernel, so the op's cost is that of its active parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch
import torch.nn.functional as F

from ..ir import Node, TensorType
from .base import AttrError, ShapeError, define, numel, same

ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


@dataclass(frozen=True)
class MoeAttrs:
    k: int  # experts per token
    renorm: bool = True  # divide the k weights by their sum (Mixtral, Qwen3-MoE) or not (OLMoE)
    act: str = "silu"  # silu | gelu | gelu_tanh


def _moe_infer(inputs, attrs):
    x, logits, gu, down = (i.type for i in inputs)
    if attrs["act"] not in ACTS:
        raise AttrError(f"moe: act must be one of {', '.join(ACTS)}, got {attrs['act']!r}")
    if gu.rank != 3 or down.rank != 3 or not same(gu.shape[1], 2 * down.shape[2]):
        raise ShapeError(f"moe: expert weights must be [E, 2I, H] and [E, H, I], got {gu.shape} and {down.shape}")
    if not (same(x.shape[-1], gu.shape[2]) and same(logits.shape[-1], gu.shape[0])):
        raise ShapeError(f"moe: x {x.shape} / router logits {logits.shape} do not fit experts {gu.shape}")
    if not 1 <= attrs["k"] <= int(gu.shape[0]):
        raise AttrError(f"moe: k={attrs['k']} must be between 1 and the {gu.shape[0]} experts")
    return TensorType(x.shape, x.dtype)


def route(logits: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], expert ids [T, k]) of the router, as transformers computes them."""
    v, i = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    return (v / v.sum(-1, keepdim=True) if renorm else v), i


def moe_reference(
    x: torch.Tensor,
    logits: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    k: int,
    renorm: bool,
    act: str,
) -> torch.Tensor:
    """Each expert runs on the tokens that chose it, and only on those."""
    xs = x.reshape(-1, x.shape[-1])  # [T, H]
    w, ids = route(logits.reshape(-1, logits.shape[-1]), k, renorm)
    out = torch.zeros_like(xs)
    inter = w_down.shape[-1]
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        h = xs[tok] @ w_gate_up[e].T  # [n, 2I]
        h = ACTS[act](h[:, :inter]) * h[:, inter:]
        out.index_add_(0, tok, (h @ w_down[e].T) * w[tok, slot, None])
    return out.reshape(x.shape)


def _moe_flops(n: Node) -> sympy.Expr:
    tokens = numel(n.inputs[0].type.shape[:-1])
    _, two_i, h = n.inputs[2].type.shape
    return 2 * tokens * n.attrs["k"] * (two_i * h + h * two_i / 2)  # active experts only


define(
    "moe",
    "matmul",
    ("x", "router_logits", "w_gate_up", "w_down"),
    MoeAttrs,
    _moe_infer,
    lambda ctx, x, a: moe_reference(x[0], x[1], x[2], x[3], a["k"], a["renorm"], a["act"]),
    "sum over the k top-softmax experts of weight * down(act(gate(x)) * up(x))",
    flops=_moe_flops,
)


def idle_expert_params(graph) -> int:
    """Parameters of the experts a token does not run: (E - k) / E of each `moe` layer's expert weights.
    Total minus this is the active parameter count of the cost report."""
    idle = 0
    for n in graph.nodes:
        if n.op == "moe":
            e = int(n.inputs[2].type.shape[0])
            per_expert = int(numel(n.inputs[2].type.shape[1:]) + numel(n.inputs[3].type.shape[1:]))
            idle += (e - n.attrs["k"]) * per_expert
    return idle
