"""Small helpers for matching node shapes in rewrite rules."""

from __future__ import annotations

from collections.abc import Iterator

from kiln.ir import Graph, Node

from .registry import count


def const_of(n: Node) -> float | None:
    """The value of a scalar constant node, or None."""
    return n.attrs["value"] if n.op == "const" else None


def strip_casts(n: Node) -> Node:
    """Look through dtype casts (mixed-precision models wrap norms in them)."""
    while n.op == "cast":
        n = n.inputs[0]
    return n


def commutative(n: Node, op: str) -> Iterator[tuple[Node, Node]]:
    """For a binary commutative node of `op`, yield both operand orders."""
    if n.op == op and len(n.inputs) == 2:
        a, b = n.inputs
        yield a, b
        yield b, a


def apply_rules(g: Graph, rules) -> int:
    """Apply local rules to a fixed point; returns the number of rewrites."""
    total = 0
    changed = True
    while changed:
        changed = False
        for n in list(g.nodes):
            if n not in g.nodes or n.op in ("input", "param"):
                continue
            for name, rule in rules:
                new = rule(g, n)
                if new is not None and new is not n:
                    g.replace_all_uses(n, new)
                    g.nodes.remove(n)
                    count(name)
                    total += 1
                    changed = True
                    break
        g.dce()
    return total
