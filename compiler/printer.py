"""Readable, diffable text form of a kiln graph."""
from __future__ import annotations

import sympy

from .ir import Graph, Node, fmt_dim


def _attr(v) -> str:
    if isinstance(v, sympy.Expr):
        return fmt_dim(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_attr(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    if callable(v):
        return getattr(v, "__name__", str(v))
    if isinstance(v, dict):
        return "{...}"
    return str(v)


def print_node(n: Node) -> str:
    attrs = {k: v for k, v in n.attrs.items() if k not in ("out_type", "args", "kwargs")}
    a = ", ".join(f"{k}={_attr(v)}" for k, v in attrs.items())
    args = ", ".join(f"%{i.name}" for i in n.inputs)
    inner = ", ".join(x for x in (args, a) if x)
    return f"  %{n.name}: {n.type} = {n.op}({inner})"


def print_graph(g: Graph) -> str:
    lines = [f"graph @{g.name}({', '.join(f'%{i.name}: {i.type}' for i in g.inputs)}) {{"]
    for n in g.nodes:
        if n.op == "input":
            continue
        lines.append(print_node(n))
    lines.append(f"  return {', '.join('%' + o.name for o in g.outputs)}")
    lines.append("}")
    return "\n".join(lines)
