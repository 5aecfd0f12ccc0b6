"""Small helpers for matching node shapes in rewrite rules."""
from __future__ import annotations

from kiln.ir import Node


def const_of(n: Node) -> float | None:
    """The value of a scalar constant node, or None."""
    return n.attrs["value"] if n.op == "const" else None


def strip_casts(n: Node) -> Node:
    """Look through dtype casts (mixed-precision models wrap norms in them)."""
    while n.op == "cast":
        n = n.inputs[0]
    return n


def commutative(n: Node, op: str):
    """For a binary commutative node of `op`, yield both operand orders."""
    if n.op == op and len(n.inputs) == 2:
        a, b = n.inputs
        yield a, b
        yield b, a
