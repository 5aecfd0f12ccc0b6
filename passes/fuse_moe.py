"""fuse-moe: recognize a traced mixture-of-experts layer as one `moe` op."""

from __future__ import annotations

from kiln.ir import Graph, Node

from .pattern import apply_rules, commutative, strip_casts
from .registry import register


def _last(n: Node, dim: int) -> bool:
    return dim in (-1, n.type.rank - 1)


def _expert_linear(y: Node) -> tuple[Node, Node, Node] | None:
    # squeeze(matmul(take(W[E, out, in], ids), unsqueeze(h, 2)), 2) -> (W, ids, h): h @ W[ids].T per row
    if y.op != "squeeze" or y.attrs["dim"] != 2 or y.inputs[0].op != "matmul":
        return None
    t, u = y.inputs[0].inputs
    if t.op != "take" or t.attrs["dim"] != 0 or t.inputs[0].type.rank != 3:
        return None
    if u.op != "unsqueeze" or u.attrs["dim"] != 2 or u.inputs[0].type.rank != 2:
        return None
    return t.inputs[0], t.inputs[1], u.inputs[0]


def _gate(h: Node, inter: int) -> tuple[str, Node] | None:
    # act(P[:, :I]) * P[:, I:] with P = the gate_up projection -> (act, P)
    for a, up in commutative(h, "mul"):
        if a.op == "silu":
            act = "silu"
        elif a.op == "gelu" and a.attrs["approximate"] in ("none", "tanh"):
            act = "gelu" if a.attrs["approximate"] == "none" else "gelu_tanh"
        else:
            continue
        g, p = a.inputs[0], up
        if g.op != "slice" or p.op != "slice" or g.inputs[0] is not p.inputs[0]:
            continue
        if (g.attrs["start"], g.attrs["end"], p.attrs["start"], p.attrs["end"]) == (0, inter, inter, 2 * inter):
            if g.attrs["dim"] == 1 and p.attrs["dim"] == 1 and g.attrs["step"] == 1 and p.attrs["step"] == 1:
                return act, g.inputs[0]
    return None


def _router(ids: Node, k: int) -> tuple[Node, Node] | None:
    # reshape(topk(softmax(logits, -1), k, indices), [-1]) -> (the topk node, logits)
    if ids.op != "reshape" or ids.type.rank != 1:
        return None
    t = ids.inputs[0]
    if t.op != "topk" or t.attrs["output"] != "indices" or t.attrs["k"] != k or not t.attrs["largest"]:
        return None
    s = t.inputs[0]
    if not _last(t.inputs[0], t.attrs["dim"]) or s.op != "softmax" or not _last(s, s.attrs["dim"]):
        return None
    return t, s.inputs[0]


def _weights(w: Node, probs: Node, k: int) -> bool | None:
    # topk values of the same softmax, optionally divided by their sum: returns renorm, or None
    w = strip_casts(w)
    renorm = False
    if w.op == "div":
        v, s = w.inputs
        if s.op != "sum" or s.inputs[0] is not v or not s.attrs["keepdim"] or list(s.attrs["dims"]) not in ([-1], [1]):
            return None
        w, renorm = strip_casts(v), True
    ok = w.op == "topk" and w.attrs["output"] == "values" and w.inputs[0] is probs and w.attrs["k"] == k
    return renorm if ok else None


def _moe(g: Graph, n: Node) -> Node | None:
    # sum(reshape(down_out * unsqueeze(reshape(weights, [-1]), 1), [T, k, H]), 1) -> moe(x, logits, Wgu, Wd)
    if n.op != "sum" or list(n.attrs["dims"]) != [1] or n.attrs["keepdim"]:
        return None
    r = n.inputs[0]
    if r.op != "reshape" or r.type.rank != 3 or not r.type.shape[1].is_Integer:
        return None
    k = int(r.type.shape[1])
    for y, wv in commutative(r.inputs[0], "mul"):
        down = _expert_linear(y)
        if down is None or wv.op != "unsqueeze" or wv.inputs[0].op != "reshape":
            continue
        w_down, ids, h = down
        gate = _gate(h, int(w_down.type.shape[2]))
        if gate is None:
            continue
        act, proj = gate
        up = _expert_linear(proj)
        if up is None or up[1] is not ids:
            continue
        w_gate_up, _, rep = up
        route = _router(ids, k)
        if route is None:
            continue
        topk, logits = route
        renorm = _weights(wv.inputs[0].inputs[0], topk.inputs[0], k)
        x = _repeated(rep, k)
        if renorm is None or x is None:
            continue
        attrs = {"k": k, "renorm": renorm, "act": act}
        return g.add("moe", [x, logits, w_gate_up, w_down], attrs, name="moe", before=n, source=n.source)
    return None


def _repeated(rep: Node, k: int) -> Node | None:
    # reshape(expand(unsqueeze(x, 1), [T, k, H]), [T*k, H]) -> x
    if rep.op != "reshape" or rep.inputs[0].op != "expand" or rep.inputs[0].inputs[0].op != "unsqueeze":
        return None
    e, u = rep.inputs[0], rep.inputs[0].inputs[0]
    if u.attrs["dim"] != 1 or e.type.rank != 3 or e.type.shape[1] != k:
        return None
    return u.inputs[0]


RULES = [("moe", _moe)]


@register("fuse-moe", phase="fuse")
def fuse_moe(graph: Graph) -> Graph:
    """Matches: transformers' experts layer as traced (its `batched_mm` form: each token's k chosen
    experts' stacked weights gathered with `take`, gate/up and down batched matmuls, the softmax-top-k
    router's weights, a sum over the k). Guarantees: each match is one `moe(x, router_logits,
    w_gate_up, w_down, k, renorm, act)` that computes only the chosen experts; the router's linear and
    any shared expert stay as they were. Exact. Does not fire on other routers (sigmoid, grouped)."""
    g = graph.copy()
    apply_rules(g, RULES)
    g.toposort()
    return g
