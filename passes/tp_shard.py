"""The weight plan of one rank under tensor parallelism: which slice of each parameter (or quantized
weight) the rank keeps, and the collectives that put the parts together. Used by the
shard-tensor-parallel pass; kept apart so that the pass holds the graph matching and this file the
slicing of weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kiln.errors import PassError
from kiln.ir import Graph, Node, ttype

from .registry import count


@dataclass
class Shard:
    """The rank's plan: how each weight parameter is split (name -> spec), for checks and the manifest."""

    g: Graph
    ranks: int
    rank: int
    specs: dict[str, dict] = field(default_factory=dict)
    done: set[Node] = field(default_factory=set)  # linears and qweights already split
    full: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the unsharded parameter shapes

    def __post_init__(self) -> None:
        self.full = {k: tuple(t.shape) for k, t in self.g.params.items()}

    def rows(self, w: Node) -> int:
        """The unsharded row count of weight `w` (a parameter or a qweight; a tied one may be split already)."""
        p = w.inputs[0] if w.op == "qweight" else w
        return self.full[p.attrs["name"]][0]

    # -- weights ------------------------------------------------------------------------------------
    def take(self, p: Node, axis: int, index: list[int], role: str) -> None:
        """Keep entries `index` of parameter node `p` along `axis` (-1 in `index`: a zero pad entry)."""
        name = p.attrs["name"]
        spec = {"axis": axis, "index": index, "role": role}
        old = self.specs.get(name)
        if old is not None:
            if (old["axis"], old["index"]) != (axis, index):
                raise PassError(
                    f"shard-tensor-parallel: parameter '{name}' is read as {old['role']} and as {role}, "
                    "which split it differently; kiln cannot give the rank one slice of it"
                )
            p.type = ttype(tuple(self.g.params[name].shape), p.type.dtype)
            return
        t = self.g.params[name]
        pad = torch.zeros_like(t.narrow(axis, 0, 1))
        ext = torch.cat([t, pad], axis)  # index -1 reads the zero row after the last
        rows = torch.tensor([i if i >= 0 else t.shape[axis] for i in index], dtype=torch.long)
        self.g.params[name] = ext.index_select(axis, rows).contiguous()
        p.type = ttype(tuple(self.g.params[name].shape), p.type.dtype)
        self.specs[name] = spec

    def weight(self, w: Node, axis: int, index: list[int], role: str) -> None:
        """Split weight `w` ([out, in]: a parameter or a `qweight`) on `axis` (0 rows, 1 input columns)."""
        if w in self.done:
            return
        self.done.add(w)
        if w.op == "param":
            self.take(w, axis, index, role)
            return
        if w.op != "qweight" or any(i.op != "param" for i in w.inputs):
            raise PassError(
                f"shard-tensor-parallel: the weight of {role} is %{w.name} = {w.op}; kiln splits parameters "
                "and quantized weights (qweight) only"
            )
        codes, scales, zeros = w.inputs
        if axis == 0:
            for p in (codes, scales, zeros):
                self.take(p, 0, index, role)
            return
        k, group, groups = int(codes.type.shape[1]), int(w.attrs["group"]), int(scales.type.shape[1])
        self.take(codes, 1, index, role)
        if groups == 1:  # one scale per output row: every column slice keeps it
            w.attrs = {**w.attrs, "group": len(index)}
        else:
            lo = index[0]
            whole = index == list(range(lo, lo + len(index))) and lo % group == 0
            if not whole or (len(index) % group and index[-1] != k - 1):
                raise PassError(
                    f"shard-tensor-parallel: {role} was quantized in groups of {group} input channels, and "
                    f"its {k} inputs split over {self.ranks} ranks cut a group; quantize with a group size "
                    f"that divides {k // self.ranks}, or run shard-tensor-parallel before quantize-weights"
                )
            gi = list(range(lo // group, -(-(index[-1] + 1) // group)))
            self.take(scales, 1, gi, role)
            self.take(zeros, 1, gi, role)
        count("qweight-split")

    def bias(self, b: Node | None, index: list[int], role: str) -> None:
        if b is not None:
            self.take(b, 0, index, role)

    # -- collectives --------------------------------------------------------------------------------
    def after(self, n: Node, make: Callable[[Node], Node]) -> Node:
        """Insert the nodes `make(n)` builds after `n` and give them n's users (and output places)."""
        users = [u for u in self.g.nodes if n in u.inputs]
        new = make(n)
        for u in users:
            u.inputs = [new if i is n else i for i in u.inputs]
        self.g.outputs = [new if o is n else o for o in self.g.outputs]
        return new

    def all_reduce(self, n: Node, bias: Node | None = None) -> Node:
        def make(x: Node) -> Node:
            r = self.g.add("all_reduce", [x], {"ranks": self.ranks}, name=x.name + "_allreduce", source=x.source)
            count("all-reduce")
            return r if bias is None else self.g.add("add", [r, bias], name=x.name + "_bias", source=x.source)

        return self.after(n, make)

    def row_parallel(self, lin: Node, index: list[int], role: str) -> None:
        """A linear whose input features are split: its partial sums meet in an all_reduce (then the bias)."""
        self.weight(lin.inputs[1], 1, index, role)
        bias = lin.input("bias")
        lin.inputs = lin.inputs[:2]
        self.all_reduce(lin, bias)

    def vocab(self, V: int) -> tuple[list[int], int, int]:
        """The rank's vocabulary rows (padded with -1 to a multiple of ranks), its first id and its end."""
        per = -(-V // self.ranks)
        lo = self.rank * per
        return [i if i < V else -1 for i in range(lo, lo + per)], lo, min(lo + per, V)


def contiguous_run(n: int, size: int, rank: int) -> list[int]:
    """Rank `rank`'s contiguous 1/n of range(size)."""
    per = size // n
    return list(range(rank * per, (rank + 1) * per))


def head_rows(heads: list[int], d: int) -> list[int]:
    """The rows of `heads` in a [heads * d, ...] weight."""
    return [h * d + i for h in heads for i in range(d)]


def index_ranges(index: list[int]) -> list[list[int]]:
    """[3, 4, 5, 9, 10] -> [[3, 6], [9, 11]]: half-open runs of consecutive indices."""
    out: list[list[int]] = []
    for i in index:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out
