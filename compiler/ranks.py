"""A simulated tensor-parallel rank group for the reference interpreter: `run_ranks(graphs, inputs)`.

Design: each rank's graph runs in its own thread through the interpreter's one op-by-op loop
(`kiln.interp.execute`), exactly as a separate process would run it, and a collective is a
rendezvous: every rank deposits its value, waits until all have, and computes the result from all of
them. This is the programming model of NCCL (ranks run independently and meet at collectives), so
the ranks' graphs need no common node order and no splitting at their collectives, and the
collectives' reference semantics live in their op records (`kiln.ops.collective`) as for any op.
Lockstep execution would need the graphs to be aligned node by node, and splitting each graph at its
collectives would need a second notion of a program; the threads need neither.

A rank that fails (or reaches a different collective than the others) breaks the group: the other
ranks stop at their next collective, and the error raised names the rank and the node.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import KilnError
from .interp import _Ctx, bind_dims, execute
from .ir import Graph, Node


class RankGroupError(KilnError):
    """The ranks of a simulated group disagree (different collectives, shapes), or one of them failed."""


class RankGroup:
    """`size` ranks exchanging values at collectives (one exchange at a time, in program order)."""

    def __init__(self, size: int, timeout: float = 600.0) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots: list[Any] = [None] * size

    def _exchange(self, rank: int, what: str, value: torch.Tensor) -> list[torch.Tensor]:
        self._slots[rank] = (what, value)
        self._wait()  # every rank has deposited
        got = list(self._slots)
        self._wait()  # every rank has read before the next exchange overwrites a slot
        kinds = {w for w, _ in got}
        if len(kinds) != 1:
            seen = ", ".join(f"rank {r}: {w}" for r, (w, _) in enumerate(got))
            raise RankGroupError(f"the ranks reached different collectives ({seen})")
        return [v for _, v in got]

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise RankGroupError("another rank of the group failed") from None

    def abort(self) -> None:
        self._barrier.abort()

    def all_reduce(self, rank: int, x: torch.Tensor, node: Node | None = None) -> torch.Tensor:
        """The sum over ranks, added in rank order so that every rank gets the same bits."""
        vals = self._exchange(rank, f"all_reduce{tuple(x.shape)}", x)
        out = vals[0].clone()
        for v in vals[1:]:
            out = out + v
        return out

    def all_gather(self, rank: int, x: torch.Tensor, dim: int, node: Node | None = None) -> torch.Tensor:
        """The ranks' values concatenated along `dim`, rank 0 first."""
        vals = self._exchange(rank, f"all_gather(dim={dim}){tuple(x.shape)}", x)
        return torch.cat(vals, dim)


class _RankCtx(_Ctx):
    def __init__(self, env: dict, group: RankGroup, rank: int) -> None:
        super().__init__(env)
        self.group, self.rank = group, rank


def run_ranks(
    graphs: Sequence[Graph], inputs: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]]
) -> list[list[torch.Tensor]]:
    """Run rank r's graph `graphs[r]` on its inputs (one dict for every rank, or one dict per rank:
    KV caches, which ranks write, must be each rank's own) as one group; returns each rank's outputs."""
    n = len(graphs)
    per_rank = [dict(inputs)] * n if isinstance(inputs, Mapping) else [dict(i) for i in inputs]
    if len(per_rank) != n:
        raise KilnError(f"run_ranks: {n} graphs but {len(per_rank)} input dicts")
    group = RankGroup(n)
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n

    def work(r: int) -> None:
        g = graphs[r]
        try:
            ctx = _RankCtx(bind_dims(g, per_rank[r]), group, r)
            with torch.no_grad():
                values = execute(g, per_rank[r], g.params, ctx)
            results[r] = [values[o] for o in g.outputs]
        except BaseException as e:  # break the group so that no rank waits forever
            errors[r] = e
            group.abort()

    threads = [threading.Thread(target=work, args=(r,), name=f"kiln-rank-{r}") for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the first rank whose failure is its own (not the broken group it left behind)
    for r, e in enumerate(errors):
        if e is not None and not (isinstance(e, RankGroupError) and "another rank" in str(e)):
            raise RankGroupError(f"rank {r} of {n}: {e}") from e
    for r, e in enumerate(errors):
        if e is not None:
            raise RankGroupError(f"rank {r} of {n}: {e}") from e
    return results
