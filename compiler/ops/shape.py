"""Shape ops: views (reshape, permute, unsqueeze, squeeze, expand, slice), cat, and the
tensor makers whose size is a dimension (arange, full)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch

from ..ir import TensorType, dim
from .base import ShapeError, define, norm_dim, numel, promote, same, torch_dtype
from .core import AxisAttrs

DimLike = Any  # an int, or a sympy expression over the graph's symbols


@dataclass(frozen=True)
class ShapeAttrs:
    shape: tuple[DimLike, ...]  # -1 once: inferred (reshape) or kept (expand)


@dataclass(frozen=True)
class PermuteAttrs:
    perm: tuple[int, ...]


@dataclass(frozen=True)
class SliceAttrs:
    dim: int
    start: DimLike
    end: DimLike  # >= 2**62 means "to the end"
    step: int = 1


@dataclass(frozen=True)
class ArangeAttrs:
    start: DimLike
    end: DimLike
    step: int = 1
    dtype: str = "int64"


@dataclass(frozen=True)
class FullAttrs:
    shape: tuple[DimLike, ...]
    value: float | int | bool
    dtype: str = "float32"


def _reshape_infer(inputs, attrs):
    src = inputs[0].type.shape
    tgt = [dim(d) for d in attrs["shape"]]
    if any(d == -1 for d in tgt):
        known = numel([d for d in tgt if d != -1])
        tgt = [sympy.simplify(numel(src) / known) if d == -1 else d for d in tgt]
    if not same(numel(src), numel(tgt)):
        raise ShapeError(f"reshape {src} -> {tuple(tgt)} changes the element count")
    return TensorType(tuple(tgt), inputs[0].type.dtype)


define("reshape", "view", ("x",), ShapeAttrs, _reshape_infer, lambda ctx, x, a: x[0].reshape(ctx.eval(a["shape"])))


def _permute_infer(inputs, attrs):
    s = inputs[0].type.shape
    return TensorType(tuple(s[p] for p in attrs["perm"]), inputs[0].type.dtype)


def _unsqueeze_infer(inputs, attrs):
    s = list(inputs[0].type.shape)
    s.insert(attrs["dim"], sympy.Integer(1))
    return TensorType(tuple(s), inputs[0].type.dtype)


def _squeeze_infer(inputs, attrs):
    s = list(inputs[0].type.shape)
    if s[attrs["dim"]] != 1:
        raise ShapeError(f"squeeze of dim {attrs['dim']} of size {s[attrs['dim']]}")
    del s[attrs["dim"]]
    return TensorType(tuple(s), inputs[0].type.dtype)


define("unsqueeze", "view", ("x",), AxisAttrs, _unsqueeze_infer, lambda ctx, x, a: x[0].unsqueeze(a["dim"]))
define("squeeze", "view", ("x",), AxisAttrs, _squeeze_infer, lambda ctx, x, a: x[0].squeeze(a["dim"]))
define("permute", "view", ("x",), PermuteAttrs, _permute_infer, lambda ctx, x, a: x[0].permute(*a["perm"]))


def _expand_infer(inputs, attrs):
    s = inputs[0].type.shape
    tgt = [dim(d) for d in attrs["shape"]]
    off = len(tgt) - len(s)
    out = []
    for i, d in enumerate(tgt):
        src = s[i - off] if i >= off else sympy.Integer(1)
        if d == -1:
            d = src
        elif src != 1 and not same(src, d):
            raise ShapeError(f"expand {s} -> {tgt}")
        out.append(d)
    return TensorType(tuple(out), inputs[0].type.dtype)


define("expand", "view", ("x",), ShapeAttrs, _expand_infer, lambda ctx, x, a: x[0].expand(*ctx.eval(a["shape"])))


def _slice_bounds(size, start, end, step):
    start, end = dim(start), dim(end)
    if start.is_Integer and start < 0:
        start = size + start
    if end.is_Integer and end < 0:
        end = size + end
    if end.is_Integer and int(end) >= 2**62:
        end = size
    elif end.is_Integer and size.is_Integer and end > size:
        end = size
    return start, end, sympy.floor((end - start + step - 1) / step) if step != 1 else end - start


def _slice_infer(inputs, attrs):
    s = list(inputs[0].type.shape)
    d = norm_dim(attrs["dim"], len(s))
    s[d] = sympy.simplify(_slice_bounds(s[d], attrs["start"], attrs["end"], attrs["step"])[2])
    return TensorType(tuple(s), inputs[0].type.dtype)


def _slice_ref(ctx, x, a):
    t = x[0]
    d = norm_dim(a["dim"], t.dim())
    start, end, _ = _slice_bounds(dim(t.shape[d]), ctx.eval(dim(a["start"])), ctx.eval(dim(a["end"])), a["step"])
    return t.narrow(d, int(start), int(end) - int(start))[(slice(None),) * d + (slice(None, None, a["step"]),)]


define("slice", "view", ("x",), SliceAttrs, _slice_infer, _slice_ref)


def _cat_infer(inputs, attrs):
    d = norm_dim(attrs["dim"], inputs[0].type.rank)
    s = list(inputs[0].type.shape)
    s[d] = sympy.simplify(sum((i.type.shape[d] for i in inputs), sympy.Integer(0)))
    return TensorType(tuple(s), promote(*[i.type.dtype for i in inputs]))


define("cat", "data", ("*xs",), AxisAttrs, _cat_infer, lambda ctx, x, a: torch.cat(list(x), dim=a["dim"]))


def _arange_infer(inputs, attrs):
    start, end, step = dim(attrs["start"]), dim(attrs["end"]), attrs["step"]
    return TensorType((sympy.simplify(sympy.ceiling((end - start) / step)),), attrs["dtype"])


define(
    "arange",
    "data",
    (),
    ArangeAttrs,
    _arange_infer,
    lambda ctx, x, a: torch.arange(
        ctx.eval(dim(a["start"])), ctx.eval(dim(a["end"])), a["step"], dtype=torch_dtype(a["dtype"])
    ),
)
define(
    "full",
    "data",
    (),
    FullAttrs,
    lambda i, a: TensorType(tuple(dim(d) for d in a["shape"]), a["dtype"]),
    lambda ctx, x, a: torch.full(ctx.eval(a["shape"]), a["value"], dtype=torch_dtype(a["dtype"])),
)
