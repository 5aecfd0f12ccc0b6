"""fuse-mlp: recognize gated MLPs (SwiGLU, GeGLU) as one `gated_mlp` op."""

from __future__ import annotations

from kiln.ir import Graph, Node

from .pattern import apply_rules, commutative
from .registry import register

_ACTS = {"silu": "silu", "gelu": "gelu"}


def _gated_mlp(g: Graph, n: Node) -> Node | None:
    # down(act(gate(x)) * up(x)) -> gated_mlp(x, Wg, Wu, Wd), all three linear without bias
    if n.op != "linear" or n.input("bias") is not None:
        return None
    for a, u in commutative(n.inputs[0], "mul"):
        if a.op not in _ACTS or (a.op == "gelu" and a.attrs["approximate"] not in ("none", "tanh")):
            continue
        gate = a.inputs[0]
        if gate.op != "linear" or u.op != "linear" or gate.input("bias") is not None or u.input("bias") is not None:
            continue
        if gate.inputs[0] is not u.inputs[0] or _kind(gate.inputs[1]) != _kind(u.inputs[1]):
            continue  # gate and up run as one kernel over stacked weights: one input, one weight format
        act = a.op if a.op == "silu" else ("gelu_tanh" if a.attrs["approximate"] == "tanh" else "gelu")
        return g.add(
            "gated_mlp",
            [gate.inputs[0], gate.inputs[1], u.inputs[1], n.inputs[1]],
            {"act": act},
            name="mlp",
            before=n,
            source=n.source,
        )
    return None


def _kind(w: Node) -> tuple:
    """A weight's storage format: fp32 parameter, or quantized (bits, group, symmetric)."""
    return (w.op, w.attrs.get("bits"), w.attrs.get("group"), w.attrs.get("sym"))


RULES = [("gated-mlp", _gated_mlp)]


@register("fuse-mlp", phase="fuse")
def fuse_mlp(graph: Graph) -> Graph:
    """Matches: `down(act(gate(x)) * up(x))` with act in {silu, gelu} and bias-free linears.
    Guarantees: each match is one `gated_mlp(x, w_gate, w_up, w_down, act)`; gate and up stored alike
    (both fp32, or one quantization scheme: a mixed-precision plan that splits them leaves the MLP unfused).
    Exact."""
    g = graph.copy()
    apply_rules(g, RULES)
    g.toposort()
    return g
