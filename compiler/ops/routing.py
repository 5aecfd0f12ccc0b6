"""Routing ops of mixture-of-experts layers: `topk` (the router's choice of experts).

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
