"""kiln IR: a typed graph of nodes with symbolic dimensions.

One small node type (`Node`) holds an op name, inputs, attributes and an output type. A `Graph`
owns nodes in topological order, its inputs, outputs, and parameters (named constant tensors).
Dimensions are sympy expressions over named symbols such as `batch`, `tokens`, `pages`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sympy

Dim = sympy.Expr


def dim(value: int | str | sympy.Expr) -> sympy.Expr:
    """Normalize an int, a symbol name or an expression into a sympy dimension."""
    if isinstance(value, sympy.Expr):
        return value
    if isinstance(value, str):
        return sympy.sympify(value, locals={n: sympy.Symbol(n, integer=True, positive=True) for n in _SYMBOLS})
    return sympy.Integer(int(value))


# Symbols that kiln gives meaning to; any other name is allowed too.
_SYMBOLS = ("batch", "tokens", "pages", "max_pages")


def sym(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def fmt_dim(d: sympy.Expr) -> str:
    return str(d).replace(" ", "")


@dataclass(frozen=True)
class TensorType:
    """Shape (sympy dims) and dtype name (torch-style: float32, int64, bool, ...)."""

    shape: tuple[sympy.Expr, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(fmt_dim(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        return len(self.shape)

    def is_static(self) -> bool:
        return all(d.is_Integer for d in self.shape)


def ttype(shape: Iterable[int | str | sympy.Expr], dtype: str = "float32") -> TensorType:
    return TensorType(tuple(dim(d) for d in shape), dtype)


_ids = itertools.count()


@dataclass(eq=False)
class Node:
    """One operation. `inputs` are Nodes (named by the op's record: `input(name)`); `attrs` are plain
    values (ints, floats, sympy dims, lists): the op's attributes, every default filled in by
    `Graph.add`, plus any annotations passes attach (`kiln.ops.ANNOTATIONS`)."""

    op: str
    inputs: list[Node]
    attrs: dict[str, Any]
    type: TensorType
    name: str = ""
    source: str | None = None  # model source line this node came from, when the tracer knows it
    uid: int = field(default_factory=lambda: next(_ids))

    def __repr__(self) -> str:
        return f"%{self.name}:{self.op}"

    def input(self, name: str) -> Node | None:
        """The input named `name` in the op's record (`kiln.ops`), or None for an absent optional one."""
        from .ops import OPS

        if self.op not in OPS:
            raise KeyError(f"%{self.name}: '{self.op}' nodes have no named inputs")
        i = OPS[self.op].input_index(name)
        return self.inputs[i] if i < len(self.inputs) else None


class Graph:
    """A kiln program: nodes in topological order, named inputs, outputs and parameters."""

    def __init__(self, name: str = "main") -> None:
        self.name = name
        self.nodes: list[Node] = []
        self.inputs: list[Node] = []
        self.outputs: list[Node] = []
        self.params: dict[str, Any] = {}  # name -> torch.Tensor
        self.meta: dict[str, Any] = {}  # model config, kv layout, entry points ...
        self._names: set[str] = set()

    # -- construction ---------------------------------------------------------------------------
    def _unique(self, base: str) -> str:
        base = base or "v"
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def add(
        self,
        op: str,
        inputs: list[Node],
        attrs: dict[str, Any] | None = None,
        type: TensorType | None = None,
        name: str = "",
        source: str | None = None,
        before: Node | None = None,
    ) -> Node:
        """Create a node; infer its type unless given. Inserted at the end or before `before`.

        `attrs` are checked against the op's record: an unknown key or a missing required one is an
        error naming the op and the key; attributes left out get their defaults."""
        from .ops import OPS

        if op not in OPS:
            raise KeyError(f"kiln has no op named '{op}'")
        rec = OPS[op]
        where = f"%{name or op}" + (f" (from {source})" if source else "") + ": "
        attrs = rec.complete(attrs or {}, where)
        rec.check_inputs(len(inputs), where)
        node = Node(
            op,
            list(inputs),
            attrs,
            type if type is not None else rec.infer(list(inputs), attrs),
            self._unique(name or op),
            source,
        )
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def add_input(self, name: str, t: TensorType) -> Node:
        node = Node("input", [], {}, t, self._unique(name))
        self.inputs.append(node)
        self.nodes.insert(len([n for n in self.nodes if n.op == "input"]), node)
        return node

    def add_param(self, name: str, tensor: Any) -> Node:
        """Register a parameter tensor and return the node that reads it."""
        from .ops import torch_dtype_name

        assert name not in self.params, name
        self.params[name] = tensor
        node = Node(
            "param",
            [],
            {"name": name},
            ttype(tuple(tensor.shape), torch_dtype_name(tensor.dtype)),
            self._unique(name.replace(".", "_")),
        )
        self.nodes.insert(len([n for n in self.nodes if n.op in ("input", "param")]), node)
        return node

    def const(self, value: float | int | bool, dtype: str = "float32", before: Node | None = None) -> Node:
        return self.add("const", [], {"value": value, "dtype": dtype}, ttype((), dtype), name="c", before=before)

    # -- queries --------------------------------------------------------------------------------
    def users(self) -> dict[Node, list[Node]]:
        out: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def param_nodes(self) -> dict[str, Node]:
        return {n.attrs["name"]: n for n in self.nodes if n.op == "param"}

    def find(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def ancestors(self, node: Node) -> set[Node]:
        seen: set[Node] = set()
        stack = list(node.inputs)
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(n.inputs)
        return seen

    # -- rewriting ------------------------------------------------------------------------------
    def replace_all_uses(self, old: Node, new: Node) -> None:
        for n in self.nodes:
            if old in n.inputs:
                n.inputs = [new if i is old else i for i in n.inputs]
        self.outputs = [new if o is old else o for o in self.outputs]

    def dce(self) -> int:
        """Remove nodes no output depends on (inputs stay; unused params go). Returns removed count."""
        live: set[Node] = set(self.outputs)
        for n in reversed(self.nodes):
            if n in live:
                live.update(n.inputs)
        dead = [n for n in self.nodes if n not in live and n.op != "input"]
        for n in dead:
            if n.op == "param" and not any(
                p.attrs["name"] == n.attrs["name"] for p in self.nodes if p is not n and p.op == "param" and p in live
            ):
                self.params.pop(n.attrs["name"], None)
        self.nodes = [n for n in self.nodes if n in live or n.op == "input"]
        return len(dead)

    def toposort(self) -> None:
        """Restore topological order after insertions out of place."""
        order: list[Node] = []
        seen: set[Node] = set()
        index = {n: i for i, n in enumerate(self.nodes)}

        def visit(n: Node) -> None:
            stack = [(n, False)]
            while stack:
                cur, done = stack.pop()
                if done:
                    order.append(cur)
                    continue
                if cur in seen:
                    continue
                seen.add(cur)
                stack.append((cur, True))
                for i in sorted(cur.inputs, key=lambda x: -index.get(x, 0)):
                    if i not in seen:
                        stack.append((i, False))

        for n in self.nodes:
            visit(n)
        self.nodes = order

    def reinfer(self) -> None:
        """Recompute every node's type from its inputs (after a pass changed an input's shape)."""
        from .ops import infer_type

        for n in self.nodes:
            if n.op not in ("input", "param", "const"):
                n.type = infer_type(n.op, n.inputs, n.attrs)

    def copy(self) -> Graph:
        """A structural copy sharing parameter tensors (passes copy-on-write the ones they change)."""
        g = Graph(self.name)
        mapping: dict[Node, Node] = {}
        for n in self.nodes:
            m = Node(n.op, [mapping[i] for i in n.inputs], dict(n.attrs), n.type, n.name, n.source)
            mapping[n] = m
            g.nodes.append(m)
            g._names.add(m.name)
        g.inputs = [mapping[i] for i in self.inputs]
        g.outputs = [mapping[o] for o in self.outputs]
        g.params = dict(self.params)
        g.meta = _deepcopy_meta(self.meta)
        return g

    # -- views ----------------------------------------------------------------------------------
    def nx(self):
        """The networkx analysis view: a DiGraph over node names with op/type attributes."""
        import networkx as nx

        G = nx.DiGraph()
        for n in self.nodes:
            G.add_node(n.name, op=n.op, type=str(n.type), attrs=n.attrs)
            for i in n.inputs:
                G.add_edge(i.name, n.name)
        return G

    def stats(self) -> dict[str, Any]:
        ops: dict[str, int] = {}
        for n in self.nodes:
            ops[n.op] = ops.get(n.op, 0) + 1
        bits = self.meta.get("param_bits", {})  # packed sub-byte parameters (quantized codes)
        nbytes = sum(
            (int(t.numel()) * bits[k] + 7) // 8 if k in bits else int(t.numel()) * t.element_size()
            for k, t in self.params.items()
        )
        return {
            "nodes": len(self.nodes),
            "ops": ops,
            "param_bytes": nbytes,
            "params": sum(int(t.numel()) for t in self.params.values()),
        }

    def __str__(self) -> str:
        from .printer import print_graph

        return print_graph(self)


def _deepcopy_meta(meta: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(meta)
