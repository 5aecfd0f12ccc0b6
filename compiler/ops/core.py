"""Core ops: elementwise arithmetic, comparisons, unary functions, reductions, cast/where/const,
matrix products and embedding lookups, and the `aten` passthrough."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.nn.functional as F

from ..ir import Node, TensorType
from .base import NoAttrs, ShapeError, broadcast_shapes, define, norm_dim, numel, promote, same, torch_dtype


@dataclass(frozen=True)
class GeluAttrs:
    approximate: str = "none"  # "none" (erf) or "tanh"


@dataclass(frozen=True)
class CastAttrs:
    dtype: str


@dataclass(frozen=True)
class ConstAttrs:
    value: float | int | bool
    dtype: str = "float32"


@dataclass(frozen=True)
class ReduceAttrs:
    dims: tuple[int, ...]
    keepdim: bool = False


@dataclass(frozen=True)
class AxisAttrs:
    dim: int


@dataclass(frozen=True)
class AtenAttrs:
    fn: Callable  # the aten overload
    args: Any  # its arguments, tensors replaced by {"__input__": index into the node's inputs}
    out_type: TensorType
    kwargs: dict = field(default_factory=dict)


# -- elementwise -------------------------------------------------------------------------------


def _ew_infer(inputs, attrs):
    t = broadcast_shapes(*[i.type.shape for i in inputs])
    return TensorType(t, promote(*[i.type.dtype for i in inputs]))


def _cmp_infer(inputs, attrs):
    return TensorType(broadcast_shapes(*[i.type.shape for i in inputs]), "bool")


_BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}
_CMP = {
    "eq": torch.eq,
    "ne": torch.ne,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "and": torch.logical_and,
    "or": torch.logical_or,
}
_UNARY = {
    "neg": torch.neg,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "relu": F.relu,
    "cos": torch.cos,
    "sin": torch.sin,
    "abs": torch.abs,
    "not": torch.logical_not,
    "erf": torch.erf,
}

for _n, _f in _BINARY.items():
    define(
        _n,
        "elementwise",
        ("a", "b"),
        NoAttrs,
        _ew_infer,
        lambda ctx, x, a, f=_f: f(x[0], x[1]),
        "elementwise, broadcasting",
    )
for _n, _f in _CMP.items():
    define(
        _n,
        "comparison",
        ("a", "b"),
        NoAttrs,
        _cmp_infer,
        lambda ctx, x, a, f=_f: f(x[0], x[1]),
        "comparison/logic, broadcasting",
    )
for _n, _f in _UNARY.items():
    define(_n, "unary", ("x",), NoAttrs, lambda i, a: i[0].type, lambda ctx, x, a, f=_f: f(x[0]), "elementwise unary")

define(
    "gelu",
    "unary",
    ("x",),
    GeluAttrs,
    lambda i, a: i[0].type,
    lambda ctx, x, a: F.gelu(x[0], approximate=a["approximate"]),
)
define(
    "cast",
    "unary",
    ("x",),
    CastAttrs,
    lambda i, a: TensorType(i[0].type.shape, a["dtype"]),
    lambda ctx, x, a: x[0].to(torch_dtype(a["dtype"])),
)
define(
    "where",
    "data",
    ("cond", "a", "b"),
    NoAttrs,
    lambda i, a: TensorType(broadcast_shapes(*[n.type.shape for n in i]), promote(i[1].type.dtype, i[2].type.dtype)),
    lambda ctx, x, a: torch.where(x[0], x[1], x[2]),
)
define(
    "const",
    "data",
    (),
    ConstAttrs,
    lambda i, a: TensorType((), a["dtype"]),
    lambda ctx, x, a: torch.tensor(a["value"], dtype=torch_dtype(ctx.node.type.dtype)),
)


# -- reductions --------------------------------------------------------------------------------


def _reduce_infer(inputs, attrs):
    shape = inputs[0].type.shape
    dims = {norm_dim(d, len(shape)) for d in attrs["dims"]}
    out = tuple(
        (sympy.Integer(1) if i in dims else d) for i, d in enumerate(shape) if attrs["keepdim"] or i not in dims
    )
    return TensorType(out, inputs[0].type.dtype)


_REDUCE = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax, "amin": torch.amin}
for _n, _f in _REDUCE.items():
    define(
        _n,
        "reduction",
        ("x",),
        ReduceAttrs,
        _reduce_infer,
        lambda ctx, x, a, f=_f: f(x[0], dim=list(a["dims"]), keepdim=bool(a["keepdim"])),
        "reduction over attrs['dims']",
    )

define(
    "softmax",
    "reduction",
    ("x",),
    AxisAttrs,
    lambda i, a: i[0].type,
    lambda ctx, x, a: torch.softmax(x[0], dim=a["dim"]),
)
define(
    "cumsum",
    "reduction",
    ("x",),
    AxisAttrs,
    lambda i, a: TensorType(i[0].type.shape, "int64" if i[0].type.dtype == "bool" else i[0].type.dtype),
    lambda ctx, x, a: torch.cumsum(x[0], dim=a["dim"]),
)


# -- linear algebra ----------------------------------------------------------------------------


def _matmul_infer(inputs, attrs):
    a, b = inputs[0].type.shape, inputs[1].type.shape
    if len(a) < 2 or len(b) < 2:
        raise ShapeError("matmul needs rank >= 2 operands")
    if not same(a[-1], b[-2]):
        raise ShapeError(f"matmul inner dims differ: {a} @ {b}")
    batch = broadcast_shapes(a[:-2], b[:-2])
    return TensorType(batch + (a[-2], b[-1]), promote(inputs[0].type.dtype, inputs[1].type.dtype))


def _matmul_flops(n: Node) -> sympy.Expr:
    return 2 * numel(n.type.shape) * n.inputs[0].type.shape[-1]


define(
    "matmul",
    "matmul",
    ("a", "b"),
    NoAttrs,
    _matmul_infer,
    lambda ctx, x, a: torch.matmul(x[0], x[1]),
    flops=_matmul_flops,
)


def _linear_infer(inputs, attrs):
    x, w, b = inputs
    if not same(x.type.shape[-1], w.type.shape[1]):
        raise ShapeError(f"linear: input features {x.type.shape[-1]} != weight in-features {w.type.shape[1]}")
    if b is not None and not same(b.type.shape[0], w.type.shape[0]):
        raise ShapeError("linear: bias length differs from out-features")
    return TensorType(x.type.shape[:-1] + (w.type.shape[0],), x.type.dtype)


def _linear_flops(n: Node) -> sympy.Expr:
    return 2 * numel(n.type.shape) * n.inputs[1].type.shape[1]


define(
    "linear",
    "matmul",
    ("x", "w", "bias?"),
    NoAttrs,
    _linear_infer,
    lambda ctx, x, a: F.linear(x[0], x[1], x[2]),
    "y = x @ w.T (+ b); w: [out, in]",
    flops=_linear_flops,
)


def _embedding_infer(inputs, attrs):
    w, ids = inputs[0].type, inputs[1].type
    return TensorType(ids.shape + (w.shape[1],), w.dtype)


define(
    "embedding",
    "data",
    ("w", "ids"),
    NoAttrs,
    _embedding_infer,
    lambda ctx, x, a: F.embedding(x[1].long(), x[0]),
    "rows of w [vocab, dim] gathered by integer ids",
)


# -- aten passthrough --------------------------------------------------------------------------


# Ops the tracer passes through from aten unchanged: they run in the interpreter (for shape-only
# subgraphs such as mask construction, which passes then remove) but have no lowering.
def _aten_ref(ctx, x, a):
    args = _rebuild(a["args"], list(x), ctx)
    kwargs = _rebuild(a["kwargs"], list(x), ctx)
    return a["fn"](*args, **kwargs)


def _rebuild(spec, tensors, ctx):
    if isinstance(spec, dict):
        if spec.get("__input__") is not None:
            return tensors[spec["__input__"]]
        return {k: _rebuild(v, tensors, ctx) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(_rebuild(s, tensors, ctx) for s in spec)
    if isinstance(spec, sympy.Expr):
        return ctx.eval(spec)
    return spec


define(
    "aten",
    "opaque",
    ("*xs",),
    AtenAttrs,
    lambda i, a: a["out_type"],
    _aten_ref,
    "an aten op passed through unchanged (no lowering)",
)
