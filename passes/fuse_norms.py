"""fuse-norms: recognize RMSNorm in the traced arithmetic and make it one `rms_norm` op."""

from __future__ import annotations

from kiln.ir import Graph, Node

from .pattern import apply_rules, commutative, const_of, strip_casts
from .registry import register


def _rms_norm(g: Graph, n: Node) -> Node | None:
    # w * (x * rsqrt(mean(x^2, -1, keepdim) + eps)), any operand order, casts around the core
    for w, h in commutative(n, "mul"):
        if w.op != "param" or w.type.rank != 1:
            continue
        for x, r in commutative(strip_casts(h), "mul"):
            if r.op != "rsqrt":
                continue
            for m, eps in commutative(r.inputs[0], "add"):
                e = const_of(eps)
                if m.op != "mean" or e is None or not m.attrs["keepdim"]:
                    continue
                if [d % x.type.rank for d in m.attrs["dims"]] != [x.type.rank - 1]:
                    continue
                p = m.inputs[0]
                squares = (p.op == "pow" and const_of(p.inputs[1]) == 2) or (
                    p.op == "mul" and p.inputs[0] is p.inputs[1]
                )
                if not squares or p.inputs[0] is not x:
                    continue
                if x.type.dtype != n.type.dtype or x.type.shape != n.type.shape:
                    continue
                return g.add("rms_norm", [x, w], {"eps": float(e)}, name="rms_norm", before=n, source=n.source)
    return None


RULES = [("rms-norm", _rms_norm)]  # w * x * rsqrt(mean(x^2) + eps) -> rms_norm(x, w)


@register("fuse-norms", phase="recognize")
def fuse_norms(graph: Graph) -> Graph:
    """Matches: RMSNorm written out as pow/mean/add/rsqrt/mul with a [dim] weight parameter
    (LayerNorm already arrives as one `layer_norm` op from the tracer).
    Guarantees: each match is one `rms_norm(x, w, eps)` node. Exact."""
    g = graph.copy()
    apply_rules(g, RULES)
    g.toposort()
    return g
