"""canonicalize: DCE, CSE, constant folding, no-op removal, and linear-layer normal form."""

from __future__ import annotations

import sympy
import torch

from kiln.ir import Graph, Node
from kiln.ops import same

from .pattern import apply_rules
from .registry import count, register


def _const_value(n: Node):
    return n.attrs["value"] if n.op == "const" else None


def _same_type(a: Node, b: Node) -> bool:
    return (
        a.type.dtype == b.type.dtype
        and a.type.rank == b.type.rank
        and all(same(x, y) for x, y in zip(a.type.shape, b.type.shape))
    )


# -- local rules: (name, rewrite) where rewrite(graph, node) returns a replacement node or None ----


def _noop_shape(g: Graph, n: Node) -> Node | None:
    # reshape/expand/permute/cast/slice that leaves its input unchanged is the input itself
    if n.op in ("reshape", "expand", "cast") and _same_type(n, n.inputs[0]):
        return n.inputs[0]
    if n.op == "permute" and list(n.attrs["perm"]) == list(range(len(n.attrs["perm"]))):
        return n.inputs[0]
    if n.op == "slice" and n.attrs["step"] == 1 and n.attrs["start"] == 0 and _same_type(n, n.inputs[0]):
        return n.inputs[0]
    return None


def _reshape_chain(g: Graph, n: Node) -> Node | None:
    # reshape(reshape(x)) == reshape(x) with the outer target shape
    if n.op == "reshape" and n.inputs[0].op in ("reshape", "unsqueeze", "squeeze"):
        return g.add(
            "reshape", [n.inputs[0].inputs[0]], {"shape": list(n.type.shape)}, name=n.name, before=n, source=n.source
        )
    return None


def _identity_arith(g: Graph, n: Node) -> Node | None:
    # x + 0, x - 0, x * 1, x / 1 (when the constant does not change x's type)
    if n.op in ("add", "sub", "mul", "div") and len(n.inputs) == 2:
        x, c = n.inputs
        neutral = 0 if n.op in ("add", "sub") else 1
        if _const_value(c) == neutral and _same_type(n, x):
            return x
        if n.op in ("add", "mul") and _const_value(x) == neutral and _same_type(n, c):
            return c
    return None


def _fold_scalar(g: Graph, n: Node) -> Node | None:
    # an elementwise op over scalar constants is a constant
    if n.inputs and all(i.op == "const" for i in n.inputs) and n.type.rank == 0 and n.op not in ("aten",):
        from kiln.ops import OPS

        v = OPS[n.op].ref(None, [torch.tensor(i.attrs["value"]) for i in n.inputs], n.attrs)
        return g.add("const", [], {"value": v.item(), "dtype": n.type.dtype}, type=n.type, name="c", before=n)
    return None


def _matmul_weight(g: Graph, n: Node) -> Node | None:
    # matmul(x, W) with W a [in, out] parameter is linear(x, W.T): one weight layout for all matmuls
    if n.op == "matmul" and n.inputs[1].op == "param" and n.inputs[1].type.rank == 2:
        w = g.params[n.inputs[1].attrs["name"]]
        name = n.inputs[1].attrs["name"] + ".T"
        wt = g.param_nodes().get(name) or g.add_param(name, w.t().contiguous())
        return g.add("linear", [n.inputs[0], wt], name=n.name, before=n, source=n.source)
    return None


def _linear_bias(g: Graph, n: Node) -> Node | None:
    # linear(x, W) + b with b a [out] parameter is linear(x, W, b)
    if n.op == "add" and len(n.inputs) == 2:
        for lin, b in (n.inputs, n.inputs[::-1]):
            if (
                lin.op == "linear"
                and lin.input("bias") is None
                and b.op == "param"
                and b.type.rank == 1
                and same(b.type.shape[0], lin.type.shape[-1])
                and _single_use(g, lin)
            ):
                return g.add("linear", lin.inputs + [b], name=lin.name, before=n, source=lin.source)
    return None


def _single_use(g: Graph, n: Node) -> bool:
    return sum(1 for m in g.nodes for i in m.inputs if i is n) + g.outputs.count(n) == 1


RULES = [
    ("noop-shape", _noop_shape),  # x.reshape(x.shape) -> x, identity permute/cast/expand/slice
    ("reshape-chain", _reshape_chain),  # reshape(reshape(x)) -> reshape(x)
    ("identity-arith", _identity_arith),  # x + 0, x * 1 -> x
    ("fold-scalar", _fold_scalar),  # op(const, const) -> const
    ("matmul-weight", _matmul_weight),  # x @ W (param) -> linear(x, W.T)
    ("linear-bias", _linear_bias),  # linear(x, W) + b -> linear(x, W, b)
]


def cse(g: Graph) -> int:
    """Merge nodes with the same op, inputs and attributes."""
    seen: dict = {}
    merged = 0
    for n in list(g.nodes):
        key: tuple
        if n.op in ("input", "param"):
            if n.op == "param":
                key = ("param", n.attrs["name"])
            else:
                continue
        else:
            key = (n.op, tuple(id(i) for i in n.inputs), _freeze(n.attrs))
        if key in seen:
            g.replace_all_uses(n, seen[key])
            g.nodes.remove(n)
            merged += 1
        else:
            seen[key] = n
    count("cse", merged) if merged else None
    return merged


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, sympy.Expr):
        return ("dim", str(v))
    if isinstance(v, float):
        return ("f", repr(v))
    try:
        hash(v)
        return v
    except TypeError:
        return ("id", id(v))


@register("canonicalize")  # no phase: cleans up after any pass
def canonicalize(graph: Graph) -> Graph:
    """Matches: dead nodes, duplicate nodes, constant scalar arithmetic, no-op reshapes/permutes/
    casts/slices, x+0 / x*1, and matmuls against weight parameters.
    Guarantees: the graph computes the same values with fewer nodes; every weight matmul is a
    `linear` over a [out, in] parameter, with its bias folded in. Exact."""
    g = graph.copy()
    dead = g.dce()
    if dead:
        count("dce", dead)
    for _ in range(4):
        n = cse(g) + apply_rules(g, RULES)
        if not n:
            break
    g.toposort()
    return g
