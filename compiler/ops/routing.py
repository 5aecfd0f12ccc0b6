"""Routing and gathers: `topk` (a mixture-of-experts router's choice of experts) and `take` (rows of
a tensor picked by integer indices: the chosen experts' weights, a rotary or position table's rows).

`torch.topk` has two results; kiln nodes have one, so the tracer makes one `topk` node per result
used (`output="values"` or `"indices"`), both with the same `k` and `dim`.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from ..ir import TensorType
from .base import AttrError, define, norm_dim


@dataclass(frozen=True)
class TopkAttrs:
    k: int
    dim: int = -1
    output: str = "values"  # "values" (the input's dtype) or "indices" (int64)
    largest: bool = True


def _topk_infer(inputs, attrs):
    if attrs["output"] not in ("values", "indices"):
        raise AttrError(f"topk: output must be 'values' or 'indices', got {attrs['output']!r}")
    t = inputs[0].type
    shape = list(t.shape)
    shape[norm_dim(attrs["dim"], len(shape))] = sympy.Integer(attrs["k"])
    return TensorType(tuple(shape), t.dtype if attrs["output"] == "values" else "int64")


def _topk_ref(ctx, x, a):
    # sorted=True: the order transformers' routing sees (ties keep torch's choice on both sides)
    r = torch.topk(x[0], a["k"], dim=a["dim"], largest=a["largest"], sorted=True)
    return r.values if a["output"] == "values" else r.indices


define(
    "topk",
    "reduction",
    ("x",),
    TopkAttrs,
    _topk_infer,
    _topk_ref,
    "the k largest entries along `dim` (values or their indices), in descending order",
)


@dataclass(frozen=True)
class TakeAttrs:
    dim: int = 0


def _take_infer(inputs, attrs):
    x, idx = inputs[0].type, inputs[1].type
    if not idx.dtype.startswith(("int", "uint")):
        raise AttrError(f"take: indices must be integers, got {idx.dtype}")
    d = norm_dim(attrs["dim"], x.rank)
    return TensorType(x.shape[:d] + idx.shape + x.shape[d + 1 :], x.dtype)


def _take_ref(ctx, x, a):
    src, idx = x
    d = a["dim"] % src.dim()
    out = src.index_select(d, idx.reshape(-1).long() % src.shape[d])  # negative indices count from the end
    return out.reshape(src.shape[:d] + idx.shape + src.shape[d + 1 :])


define(
    "take",
    "data",
    ("x", "indices"),
    TakeAttrs,
    _take_infer,
    _take_ref,
    "x indexed along `dim` by an integer tensor (numpy's take; torch's x[..., idx, ...] with one index)",
)
