"""Collectives of a tensor-parallel rank group: `all_reduce` (sum over ranks) and `all_gather`
(concatenation over ranks along one axis). shard-tensor-parallel inserts them.

Their reference semantics need the other ranks' values, so they run under `kiln.ranks.run_ranks`,
which interprets every rank's graph and hands each collective the group it belongs to (`ctx.group`,
`ctx.rank`). In a plain `kiln.interp.run` a group of one is the identity and a larger group is an
error that says where to run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch

from ..errors import KilnError
from ..ir import Node, TensorType
from .base import ShapeError, define, norm_dim, tensor_bytes


@dataclass(frozen=True)
class AllReduceAttrs:
    ranks: int  # the group's size
    reduce: str = "sum"  # the only reduction tensor parallelism needs


@dataclass(frozen=True)
class AllGatherAttrs:
    ranks: int
    dim: int  # the axis the ranks' parts are concatenated along, rank 0 first


def _group(ctx: Any, op: str, ranks: int) -> Any:
    group = getattr(ctx, "group", None)
    if group is None and ranks > 1:
        raise KilnError(
            f"{op} over {ranks} ranks needs the other ranks' values: run the rank graphs together with "
            "kiln.ranks.run_ranks(graphs, inputs)"
        )
    if group is not None and group.size != ranks:
        raise KilnError(f"{op} expects a group of {ranks} ranks, but runs in a group of {group.size}")
    return group


def _all_reduce_ref(ctx: Any, x: list, a: dict) -> torch.Tensor:
    if a["reduce"] != "sum":
        raise KilnError(f"all_reduce: unknown reduction {a['reduce']!r} (kiln reduces by sum)")
    group = _group(ctx, "all_reduce", a["ranks"])
    return x[0] if group is None else group.all_reduce(ctx.rank, x[0], ctx.node)


def _all_gather_infer(inputs: list[Node], attrs: dict) -> TensorType:
    t = inputs[0].type
    if not t.rank:
        raise ShapeError("all_gather needs a tensor of rank >= 1")
    d = norm_dim(attrs["dim"], t.rank)
    if not 0 <= d < t.rank:
        raise ShapeError(f"all_gather: dim {attrs['dim']} is out of range for {t}")
    shape = list(t.shape)
    shape[d] = shape[d] * sympy.Integer(attrs["ranks"])
    return TensorType(tuple(shape), t.dtype)


def _all_gather_ref(ctx: Any, x: list, a: dict) -> torch.Tensor:
    group = _group(ctx, "all_gather", a["ranks"])
    return x[0] if group is None else group.all_gather(ctx.rank, x[0], a["dim"], ctx.node)


def _traffic(n: Node) -> sympy.Expr:
    # what one rank sends and receives in a ring: 2 (N-1)/N of the tensor for all_reduce,
    # (N-1)/N of the gathered tensor for all_gather
    ranks = sympy.Integer(n.attrs["ranks"])
    scale = 2 if n.op == "all_reduce" else 1
    return scale * tensor_bytes(n.type) * (ranks - 1) / ranks


define(
    "all_reduce",
    "collective",
    ("x",),
    AllReduceAttrs,
    lambda i, a: i[0].type,
    _all_reduce_ref,
    "the sum of x over the ranks of the group; every rank receives it",
    bytes=_traffic,
)
define(
    "all_gather",
    "collective",
    ("x",),
    AllGatherAttrs,
    _all_gather_infer,
    _all_gather_ref,
    "the ranks' x concatenated along `dim`, rank 0 first (equal parts); every rank receives it",
    bytes=_traffic,
)
