"""Verifier: every node's inputs are defined before it, its inputs and attributes are what its op's
record declares, and its type is what its op infers."""

from __future__ import annotations

from .ir import Graph, Node
from .ops import OPS, AttrError, ShapeError, same


class VerifyError(ValueError):
    pass


def verify(graph: Graph) -> None:
    """Raise VerifyError naming the first node that breaks ordering, typing or parameter rules."""
    defined: set = set()
    names: set[str] = set()
    for n in graph.nodes:
        if n.name in names:
            raise VerifyError(f"duplicate node name %{n.name}")
        names.add(n.name)
        for i in n.inputs:
            if i not in defined:
                raise VerifyError(f"%{n.name} ({n.op}) uses %{i.name} before it is defined")
        if n.op == "param":
            p = graph.params.get(n.attrs["name"])
            if p is None:
                raise VerifyError(f"%{n.name} reads parameter '{n.attrs['name']}' that the graph does not hold")
            if tuple(p.shape) != tuple(int(d) for d in n.type.shape):
                raise VerifyError(
                    f"parameter '{n.attrs['name']}' has shape {tuple(p.shape)} but %{n.name} says {n.type}"
                )
        elif n.op != "input":
            if n.op not in OPS:
                raise VerifyError(f"%{n.name} uses unknown op '{n.op}'")
            _check_record(n)
            try:
                t = OPS[n.op].infer(n.inputs, n.attrs)
            except Exception as e:
                raise VerifyError(f"%{n.name} = {n.op}: {e}") from e
            if (
                t.dtype != n.type.dtype
                or len(t.shape) != len(n.type.shape)
                or not all(same(a, b) for a, b in zip(t.shape, n.type.shape))
            ):
                raise VerifyError(f"%{n.name} = {n.op} is typed {n.type} but its inputs give {t}")
        defined.add(n)
    for o in graph.outputs:
        if o not in defined:
            raise VerifyError(f"output %{o.name} is not defined in the graph")
    for i in graph.inputs:
        if i not in defined:
            raise VerifyError(f"input %{i.name} is missing from the node list")


def _check_record(n: Node) -> None:
    # a pass that edits attrs or inputs in place (or builds a Node by hand) can break the record's
    # promises that every consumer relies on: known keys only, and every attribute present
    rec = OPS[n.op]
    try:
        rec.check_inputs(len(n.inputs), f"%{n.name}: ")
        full = rec.complete(n.attrs, f"%{n.name}: ")
    except (AttrError, ShapeError) as e:
        raise VerifyError(str(e)) from e
    missing = [k for k in full if k not in n.attrs]
    if missing:
        raise VerifyError(
            f"%{n.name} = {n.op} lacks attribute(s) {', '.join(missing)}; create nodes with Graph.add, "
            "which fills in defaults"
        )
