"""Readable, diffable text form of a kiln graph."""

from __future__ import annotations

from typing import Any

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


def _is_default(v: Any, d: Any) -> bool:
    # same type and equal: a sympy 1 is not an int 1 here, and an array never compares to a default
    return v is d or (type(v) is type(d) and not isinstance(v, (list, tuple, dict)) and v == d)


def print_node(n: Node) -> str:
    from .ops import OPS

    # attributes at their default are left out: Graph.add fills them in, the text need not repeat them
    defaults = OPS[n.op].defaults() if n.op in OPS else {}
    attrs = {
        k: v
        for k, v in n.attrs.items()
        if k not in ("out_type", "args", "kwargs") and not (k in defaults and _is_default(v, defaults[k]))
    }
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
