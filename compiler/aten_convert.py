"""The conversion table of the tracer: how each aten op of a `torch.export` graph becomes kiln IR.

One entry per aten op (`_CONVERT[aten.x] = fn(converter, *args)`); `compiler/trace.py` walks the
exported graph and calls them. An aten op with no entry stops the trace with an error naming it and
the model's source line.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sympy
import torch

from . import capture
from .errors import UnsupportedOpError
from .ops import torch_dtype_name

if TYPE_CHECKING:
    from .trace import _Converter


def source_line(fx_node) -> str | None:
    """The innermost model-code frame of a node's stack trace: 'file.py:123 `code`'."""
    st = fx_node.meta.get("stack_trace")
    if not st:
        return None
    lines = st.strip().splitlines()
    best = None
    for i, ln in enumerate(lines):
        ln = ln.strip()
        if ln.startswith("File "):
            path = ln.split('"')[1] if '"' in ln else ""
            if "/torch/" in path and "/transformers/" not in path:
                continue
            try:
                lineno = ln.split("line ")[1].split(",")[0]
            except IndexError:
                lineno = "?"
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            best = f"{os.path.basename(path)}:{lineno} `{code}`"
    return best


aten = torch.ops.aten
_CONVERT: dict[Any, Callable] = {}


def _conv(*targets):
    def deco(fn):
        for t in targets:
            _CONVERT[t] = fn
        return fn

    return deco


def _binary(op):
    def fn(c: _Converter, x, y, alpha=1, **kw):
        a = c.tensor(x) if isinstance(x, torch.fx.Node) else None
        b = c.tensor(y, like=a) if a is not None else c.tensor(y)
        if a is None:
            a = c.tensor(x, like=b)
        if alpha != 1:
            b = c.g.add("mul", [b, c.tensor(alpha, like=b)], name="alpha")
        return c.add(op, [a, b])

    return fn


for _target, _op in [
    (aten.add.Tensor, "add"),
    (aten.add.Scalar, "add"),
    (aten.sub.Tensor, "sub"),
    (aten.sub.Scalar, "sub"),
    (aten.mul.Tensor, "mul"),
    (aten.mul.Scalar, "mul"),
    (aten.div.Tensor, "div"),
    (aten.div.Scalar, "div"),
    (aten.pow.Tensor_Scalar, "pow"),
    (aten.pow.Tensor_Tensor, "pow"),
    (aten.pow.Scalar, "pow"),
    (torch.ops.prims.pow.default, "pow"),
    (aten.maximum.default, "maximum"),
    (aten.minimum.default, "minimum"),
    (aten.eq.Tensor, "eq"),
    (aten.eq.Scalar, "eq"),
    (aten.ne.Tensor, "ne"),
    (aten.ne.Scalar, "ne"),
    (aten.lt.Tensor, "lt"),
    (aten.lt.Scalar, "lt"),
    (aten.le.Tensor, "le"),
    (aten.le.Scalar, "le"),
    (aten.gt.Tensor, "gt"),
    (aten.gt.Scalar, "gt"),
    (aten.ge.Tensor, "ge"),
    (aten.ge.Scalar, "ge"),
    (aten.__and__.Tensor, "and"),
    (aten.bitwise_and.Tensor, "and"),
    (aten.logical_and.default, "and"),
    (aten.__or__.Tensor, "or"),
    (aten.bitwise_or.Tensor, "or"),
    (aten.logical_or.default, "or"),
]:
    _CONVERT[_target] = _binary(_op)

_CONVERT[aten.rsub.Scalar] = lambda c, x, y, alpha=1: _binary("sub")(c, y, x)
# prims the full decomposition table can leave behind (compiler/decompose.py), as kiln elementwise ops
_CONVERT[torch.ops.prims.exp2.default] = lambda c, x: _binary("pow")(c, 2.0, x)
_CONVERT[torch.ops.prims.log1p.default] = lambda c, x: c.add("log", [_binary("add")(c, x, 1.0)])

for _target, _op in [
    (aten.neg.default, "neg"),
    (aten.exp.default, "exp"),
    (aten.log.default, "log"),
    (aten.sqrt.default, "sqrt"),
    (aten.rsqrt.default, "rsqrt"),
    (aten.tanh.default, "tanh"),
    (aten.sigmoid.default, "sigmoid"),
    (aten.silu.default, "silu"),
    (aten.relu.default, "relu"),
    (aten.cos.default, "cos"),
    (aten.sin.default, "sin"),
    (aten.abs.default, "abs"),
    (aten.erf.default, "erf"),
    (aten.logical_not.default, "not"),
    (aten.bitwise_not.default, "not"),
]:
    _CONVERT[_target] = (lambda op: lambda c, x: c.add(op, [c.tensor(x)]))(_op)


@_conv(aten.gelu.default)
def _gelu(c, x, approximate="none"):
    return c.add("gelu", [c.tensor(x)], {"approximate": approximate})


@_conv(aten.embedding.default)
def _embedding(c, w, ids, *rest):
    return c.add("embedding", [c.tensor(w), c.tensor(ids)])


@_conv(aten.linear.default)
def _linear(c, x, w, b=None):
    return c.add("linear", [c.tensor(x), c.tensor(w)] + ([c.tensor(b)] if b is not None else []))


@_conv(aten.addmm.default)
def _addmm(c, b, x, w, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise UnsupportedOpError("aten.addmm (beta/alpha != 1)", source_line(c.node))
    mm = c.g.add("matmul", [c.tensor(x), c.tensor(w)], name=c.node.name + "_mm", source=source_line(c.node))
    return c.add("add", [mm, c.tensor(b)])


@_conv(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(c, a, b):
    return c.add("matmul", [c.tensor(a), c.tensor(b)])


def _dims(v):
    return [v] if isinstance(v, int) else list(v)


@_conv(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default)
def _reduce(c, x, dims=None, keepdim=False, dtype=None):
    op = {aten.mean.dim: "mean", aten.sum.dim_IntList: "sum", aten.amax.default: "amax"}[c.node.target]
    t = c.tensor(x)
    return c.add(
        op, [t], {"dims": _dims(dims) if dims is not None else list(range(t.type.rank)), "keepdim": bool(keepdim)}
    )


@_conv(aten._softmax.default, aten.softmax.int)
def _softmax(c, x, dim, *rest):
    return c.add("softmax", [c.tensor(x)], {"dim": dim})


@_conv(aten.cumsum.default)
def _cumsum(c, x, dim, dtype=None):
    return c.add("cumsum", [c.tensor(x)], {"dim": dim})


@_conv(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _reshape(c, x, shape):
    return c.add("reshape", [c.tensor(x)], {"shape": [c.dimval(s) for s in shape]})


@_conv(aten.unsqueeze.default)
def _unsqueeze(c, x, d):
    t = c.tensor(x)
    return c.add("unsqueeze", [t], {"dim": d if d >= 0 else d + t.type.rank + 1})


@_conv(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(c, x, d):
    t = c.tensor(x)
    out = t
    for k in sorted([x % t.type.rank for x in _dims(d)], reverse=True):
        if out.type.shape[k] == 1:
            out = c.add("squeeze", [out], {"dim": k})
    return out


@_conv(aten.transpose.int)
def _transpose(c, x, d0, d1):
    t = c.tensor(x)
    perm = list(range(t.type.rank))
    d0, d1 = d0 % t.type.rank, d1 % t.type.rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return c.add("permute", [t], {"perm": perm})


@_conv(aten.permute.default)
def _permute(c, x, perm):
    t = c.tensor(x)
    return c.add("permute", [t], {"perm": [p % t.type.rank for p in perm]})


@_conv(aten.t.default)
def _t(c, x):
    return c.add("permute", [c.tensor(x)], {"perm": [1, 0]})


@_conv(aten.expand.default)
def _expand(c, x, shape, implicit=False):
    return c.add("expand", [c.tensor(x)], {"shape": [c.dimval(s) for s in shape]})


@_conv(aten.slice.Tensor)
def _slice(c, x, dim=0, start=None, end=None, step=1):
    return c.add(
        "slice",
        [c.tensor(x)],
        {
            "dim": dim,
            "start": c.dimval(start) if start is not None else 0,
            "end": c.dimval(end) if end is not None else 2**63 - 1,
            "step": step,
        },
    )


@_conv(aten.select.int)
def _select(c, x, dim, index):
    t = c.tensor(x)
    s = c.g.add(
        "slice",
        [t],
        {"dim": dim, "start": index, "end": index + 1 if index != -1 else 2**63 - 1},
        name=c.node.name + "_slice",
        source=source_line(c.node),
    )
    return c.add("squeeze", [s], {"dim": dim % t.type.rank})


@_conv(aten.cat.default)
def _cat(c, xs, dim=0):
    return c.add("cat", [c.tensor(x) for x in xs], {"dim": dim})


@_conv(aten.split.Tensor, aten.split_with_sizes.default)
def _split(c, x, sizes, dim=0):
    t = c.tensor(x)
    d = dim % t.type.rank
    total = t.type.shape[d]
    if isinstance(sizes, int):
        sizes = [sizes] * int(sympy.ceiling(total / sizes))
    outs, start = [], 0
    for i, s in enumerate(sizes):
        outs.append(
            c.g.add(
                "slice",
                [t],
                {"dim": d, "start": start, "end": start + s},
                name=f"{c.node.name}_{i}",
                source=source_line(c.node),
            )
        )
        start += s
    return tuple(outs)


_CONVERT[operator.getitem] = lambda c, xs, i: c.values[xs][i] if isinstance(xs, torch.fx.Node) else xs[i]


def _identity(c, x, *a, **kw):
    return c.tensor(x)


for _target in (
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
    aten.lift_fresh_copy.default,
    aten.detach.default,
    aten.dropout.default,
):
    _CONVERT[_target] = _identity


@_conv(aten._to_copy.default, aten.to.dtype)
def _to_copy(c, x, *a, dtype=None, **kw):
    t = c.tensor(x)
    if dtype is None or torch_dtype_name(dtype) == t.type.dtype:
        return t
    return c.add("cast", [t], {"dtype": torch_dtype_name(dtype)})


def _skip(c, *a, **kw):
    return None


for _target in (
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
):
    _CONVERT[_target] = _skip


@_conv(aten.sym_size.int)
def _sym_size(c, x, d):
    return c.expr(c.node.meta["val"].node.expr) if isinstance(c.node.meta["val"], torch.SymInt) else c.node.meta["val"]


for _pyop in (operator.mul, operator.add, operator.sub, operator.floordiv):
    _CONVERT[_pyop] = lambda c, *a: (
        c.expr(c.node.meta["val"].node.expr) if isinstance(c.node.meta["val"], torch.SymInt) else c.node.meta["val"]
    )


@_conv(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(c, *args, dtype=None, **kw):
    vals = [c.dimval(a) for a in args]
    start, end, step = (0, vals[0], 1) if len(vals) == 1 else (vals[0], vals[1], vals[2] if len(vals) > 2 else 1)
    return c.add(
        "arange",
        [],
        {"start": start, "end": end, "step": step, "dtype": torch_dtype_name(dtype) if dtype else c.out_type().dtype},
    )


@_conv(
    aten.full.default,
    aten.new_ones.default,
    aten.new_zeros.default,
    aten.new_full.default,
    aten.ones.default,
    aten.zeros.default,
    aten.scalar_tensor.default,
    aten.full_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
)
def _full(c, *args, **kw):
    t = c.out_type()
    tgt = c.node.target
    value = {
        aten.new_ones.default: 1,
        aten.ones.default: 1,
        aten.ones_like.default: 1,
        aten.new_zeros.default: 0,
        aten.zeros.default: 0,
        aten.zeros_like.default: 0,
    }.get(tgt)
    if value is None:
        value = args[-1] if tgt in (aten.full.default, aten.new_full.default, aten.full_like.default) else args[0]
    return c.add("full", [], {"shape": list(t.shape), "value": value, "dtype": t.dtype})


@_conv(aten.where.self)
def _where(c, cond, x, y):
    a = c.tensor(x) if isinstance(x, torch.fx.Node) else None
    b = c.tensor(y, like=a)
    return c.add("where", [c.tensor(cond), a if a is not None else c.tensor(x, like=b), b])


@_conv(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(c, x, mask, value):
    t = c.tensor(x)
    return c.add("where", [c.tensor(mask), c.tensor(value, like=t), t])


@_conv(aten.layer_norm.default)
def _layer_norm(c, x, shape, w=None, b=None, eps=1e-5, *rest):
    ins = [c.tensor(x)] + ([c.tensor(w)] if w is not None else []) + ([c.tensor(b)] if b is not None else [])
    if w is None and b is not None:
        raise UnsupportedOpError("aten.layer_norm (bias without weight)", source_line(c.node))
    return c.add("layer_norm", ins, {"eps": float(eps), "ndim": len(shape)})


@_conv(aten.scaled_dot_product_attention.default)
def _sdpa(c, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    qn = c.tensor(q)
    ins = [qn, c.tensor(k), c.tensor(v)] + ([c.tensor(attn_mask)] if attn_mask is not None else [])
    if scale is None:
        scale = 1.0 / float(qn.type.shape[-1]) ** 0.5
    return c.add("sdpa", ins, {"scale": float(scale), "causal": bool(is_causal), "gqa": bool(enable_gqa)})


# Ops passed through for shape-only subgraphs (mask construction); they have no lowering.
_PASSTHROUGH = {aten.index.Tensor, aten.diff.default, aten.tril.default, aten.triu.default}


@_conv(aten.topk.default)
def _topk(c, x, k, dim=-1, largest=True, sorted=True):
    t = c.tensor(x)
    attrs = {"k": int(k), "dim": dim % t.type.rank, "largest": bool(largest)}
    src = source_line(c.node)
    vals = c.g.add("topk", [t], {**attrs, "output": "values"}, name=c.node.name + "_values", source=src)
    idx = c.g.add("topk", [t], {**attrs, "output": "indices"}, name=c.node.name + "_indices", source=src)
    return (vals, idx)


@_conv(aten.index.Tensor)
def _index(c, x, indices):
    """x[..., idx, ...] with one integer index tensor is a `take`; other advanced indexing (several index
    tensors, boolean masks) passes through for the shape-only subgraphs that use it (mask construction)."""
    given = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(given) == 1:
        d, i = given[0]
        idx = c.tensor(i)
        if idx.type.dtype.startswith(("int", "uint")):
            return c.add("take", [c.tensor(x), idx], {"dim": d})
    return c.passthrough(c.node)


_CONVERT[torch.ops.prims.reciprocal.default] = lambda c, x: _binary("div")(c, 1.0, x)


def _present(c, name: str, *optional) -> list:
    """The optional inputs given, in order; absent ones may only trail (an op record's rule)."""
    given = [o is not None for o in optional]
    if any(b and not a for a, b in zip(given, given[1:])):
        raise UnsupportedOpError(name, source_line(c.node), "an optional input is given after an absent one")
    return [c.tensor(o) for o in optional if o is not None]


@_conv(capture.selective_scan_op._opoverload)
def _selective_scan(c, x, dt, A, B, C, D, dt_bias, z, softplus, dt_min, dt_max):
    ins = [c.tensor(v) for v in (x, dt, A, B, C)] + _present(c, "kiln.selective_scan", D, dt_bias, z)
    return c.add("selective_scan", ins, {"softplus": bool(softplus), "dt_min": float(dt_min), "dt_max": float(dt_max)})


@_conv(capture.causal_conv1d_op._opoverload)
def _causal_conv1d(c, x, weight, bias, act):
    ins = [c.tensor(x), c.tensor(weight)] + ([c.tensor(bias)] if bias is not None else [])
    return c.add("causal_conv1d", ins, {"act": str(act)})
