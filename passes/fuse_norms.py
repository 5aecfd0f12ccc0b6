"""fuse-norms: recognize RMSNorm in the traced arithmetic and make it one `rms_norm` op."""

from __future__ import annotations

from kiln.ir import Graph, Node

from .pattern import apply_rules, commutative, const_of, strip_casts
from .registry import count, register


def _norm_weight(g: Graph, w: Node) -> Node | None:
    """The norm's [dim] weight as a parameter: a parameter itself, or Gemma's `(1 + w)` (a parameter plus a
    scalar constant), folded into a new parameter once at build time. The fold is exact: it is the same
    fp32 addition the plain graph does on every call."""
    if w.op == "param" and w.type.rank == 1:
        return w
    for p, c in commutative(w, "add"):
        v = const_of(c)
        if p.op != "param" or p.type.rank != 1 or v is None or w.type != p.type:
            continue
        name = f"{p.attrs['name']}.plus_{v:g}"
        folded = g.param_nodes().get(name)
        if folded is None:
            src = g.params[p.attrs["name"]]
            folded = g.add_param(name, (src + v).to(src.dtype))
            count("offset-weight-folded")
        return folded
    return None


def _rms_norm(g: Graph, n: Node) -> Node | None:
    # w * (x * rsqrt(mean(x^2, -1, keepdim) + eps)), any operand order, casts around the core
    for w0, h in commutative(n, "mul"):
        if w0.type.rank != 1:
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
                w = _norm_weight(g, w0)
                if w is None:
                    continue
                return g.add("rms_norm", [x, w], {"eps": float(e)}, name="rms_norm", before=n, source=n.source)
    return None


RULES = [("rms-norm", _rms_norm)]  # w * x * rsqrt(mean(x^2) + eps) -> rms_norm(x, w), w may be (1 + w)


def norm_fallbacks(g: Graph) -> list[dict]:
    """RMS-style normalizations left as plain ops (an `rsqrt` of a last-dim mean), with the reason: the
    build report lists them so that a slow build is explained rather than silent."""
    out = []
    for r in g.find("rsqrt"):
        m = next((i for i in r.inputs[0].inputs if i.op == "mean"), None) if r.inputs[0].op == "add" else None
        if m is None:
            continue
        why = "its weight is not a [dim] parameter (or 1 + one), or the input's dtype or shape changes"
        out.append({"node": r.name, "source": r.source, "reason": why})
    return out


@register("fuse-norms", phase="recognize")
def fuse_norms(graph: Graph) -> Graph:
    """Matches: RMSNorm written out as pow/mean/add/rsqrt/mul with a [dim] weight parameter, or Gemma's
    `(1 + w)` weight (folded into a new parameter `<name>.plus_1`); LayerNorm already arrives as one
    `layer_norm` op from the tracer.
    Guarantees: each match is one `rms_norm(x, w, eps)` node; normalizations that did not match are listed
    in `graph.meta["norm_fallbacks"]`. Exact."""
    g = graph.copy()
    apply_rules(g, RULES)
    g.toposort()
    g.meta["norm_fallbacks"] = norm_fallbacks(g)
    return g
