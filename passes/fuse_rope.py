"""fuse-rope: recognize rotary position embedding (the rotate-half form) as one `rope` op."""

from __future__ import annotations

from kiln.ir import Graph, Node
from kiln.ops import same

from .pattern import apply_rules, commutative
from .registry import register


def _rotate_half_of(r: Node) -> Node | None:
    # cat(-x[..., h:], x[..., :h], dim=-1) -> x
    if r.op != "cat" or len(r.inputs) != 2 or r.attrs["dim"] % r.type.rank != r.type.rank - 1:
        return None
    neg, lo = r.inputs
    if neg.op != "neg" or neg.inputs[0].op != "slice" or lo.op != "slice":
        return None
    hi = neg.inputs[0]
    x = lo.inputs[0]
    if hi.inputs[0] is not x:
        return None
    last = x.type.rank - 1
    half = x.type.shape[-1] / 2
    for s in (hi, lo):
        if s.attrs["dim"] % x.type.rank != last or s.attrs["step"] != 1:
            return None
    if not (same(lo.type.shape[-1], half) and same(hi.type.shape[-1], half) and lo.attrs["start"] == 0):
        return None
    return x


def _rope(g: Graph, n: Node) -> Node | None:
    # x * cos + rotate_half(x) * sin -> rope(x, cos, sin)
    for a, b in commutative(n, "add"):
        for x, cos in commutative(a, "mul"):
            for r, sin in commutative(b, "mul"):
                if _rotate_half_of(r) is x and x.type.shape == n.type.shape:
                    return g.add("rope", [x, cos, sin], {}, name="rope", before=n, source=n.source)
    return None


RULES = [("rope", _rope)]


@register("fuse-rope", phase="recognize")
def fuse_rope(graph: Graph) -> Graph:
    """Matches: `x * cos + cat(-x[..., h:], x[..., :h]) * sin` (rotary embedding, rotate-half
    layout as in Llama/Qwen2/Mistral), cos/sin being any tensors that broadcast against x.
    Guarantees: each match becomes `rope(x, cos, sin)`. Exact."""
    g = graph.copy()
    apply_rules(g, RULES)
    g.toposort()
    return g
