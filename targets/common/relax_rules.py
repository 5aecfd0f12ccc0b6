"""The "relax" lowering rules: what any TVM target can use for an op (elementwise, shape ops, reductions,
norms, rotary, embeddings, linears through the target's `linear` kernel). A target's own rules, registered
under its name, take precedence (`RelaxLowering.backends`)."""

from __future__ import annotations

import numpy as np
import sympy
from tvm import relax

from kiln.ir import Node
from kiln.ops import OPS, register_rule

from .relax import tir_dim

# -- generic rules (any TVM target) ------------------------------------------------------------------


@register_rule("relax", "const")
def _const(f, n, xs):
    return relax.const(np.array(n.attrs["value"], dtype=n.type.dtype), n.type.dtype)


_BIN = {
    "add": relax.op.add,
    "sub": relax.op.subtract,
    "mul": relax.op.multiply,
    "div": relax.op.divide,
    "pow": relax.op.power,
    "maximum": relax.op.maximum,
    "minimum": relax.op.minimum,
    "eq": relax.op.equal,
    "ne": relax.op.not_equal,
    "lt": relax.op.less,
    "le": relax.op.less_equal,
    "gt": relax.op.greater,
    "ge": relax.op.greater_equal,
    "and": relax.op.logical_and,
    "or": relax.op.logical_or,
}
_UN = {
    "neg": relax.op.negative,
    "exp": relax.op.exp,
    "log": relax.op.log,
    "sqrt": relax.op.sqrt,
    "rsqrt": relax.op.rsqrt,
    "tanh": relax.op.tanh,
    "sigmoid": relax.op.sigmoid,
    "silu": relax.op.nn.silu,
    "relu": relax.op.nn.relu,
    "cos": relax.op.cos,
    "sin": relax.op.sin,
    "abs": relax.op.abs,
    "not": relax.op.logical_not,
    "erf": relax.op.erf,
}


def _operand(f, node: Node, x, dtype: str):
    return x if node.type.dtype == dtype else f.emit(relax.op.astype(x, dtype))


@register_rule("relax", *_BIN)
def _binary(f, n, xs):
    dt = n.type.dtype
    return f.emit(_BIN[n.op](*[_operand(f, i, x, dt if dt != "bool" else i.type.dtype) for i, x in zip(n.inputs, xs)]))


@register_rule("relax", *_UN)
def _unary(f, n, xs):
    return f.emit(_UN[n.op](xs[0]))


@register_rule("relax", "gelu")
def _gelu(f, n, xs):
    return f.emit((relax.op.nn.gelu_tanh if n.attrs["approximate"] == "tanh" else relax.op.nn.gelu)(xs[0]))


@register_rule("relax", "cast")
def _cast(f, n, xs):
    return f.emit(relax.op.astype(xs[0], n.type.dtype))


@register_rule("relax", "where")
def _where(f, n, xs):
    return f.emit(
        relax.op.where(
            xs[0], _operand(f, n.inputs[1], xs[1], n.type.dtype), _operand(f, n.inputs[2], xs[2], n.type.dtype)
        )
    )


@register_rule("relax", "sum", "mean", "amax", "amin")
def _reduce(f, n, xs):
    fn = {"sum": relax.op.sum, "mean": relax.op.mean, "amax": relax.op.max, "amin": relax.op.min}[n.op]
    return f.emit(fn(xs[0], axis=list(n.attrs["dims"]), keepdims=bool(n.attrs["keepdim"])))


@register_rule("relax", "softmax")
def _softmax(f, n, xs):
    return f.emit(relax.op.nn.softmax(xs[0], axis=n.attrs["dim"]))


@register_rule("relax", "matmul")
def _matmul(f, n, xs):
    return f.emit(relax.op.matmul(xs[0], xs[1]))


@register_rule("relax", "reshape")
def _reshape(f, n, xs):
    return f.emit(relax.op.reshape(xs[0], f.dims(n.type.shape)))


@register_rule("relax", "unsqueeze")
def _unsqueeze(f, n, xs):
    return f.emit(relax.op.expand_dims(xs[0], [n.attrs["dim"]]))


@register_rule("relax", "squeeze")
def _squeeze(f, n, xs):
    return f.emit(relax.op.squeeze(xs[0], [n.attrs["dim"]]))


@register_rule("relax", "permute")
def _permute(f, n, xs):
    return f.emit(relax.op.permute_dims(xs[0], list(n.attrs["perm"])))


@register_rule("relax", "expand")
def _expand(f, n, xs):
    return f.emit(relax.op.broadcast_to(xs[0], f.dims(n.type.shape)))


@register_rule("relax", "slice")
def _slice(f, n, xs):
    from kiln.ops import _slice_bounds

    if n.attrs.get("last_token") and f.entry.all_logits:
        return xs[0]  # verify entry point: logits for every token
    d = n.attrs["dim"] % n.type.rank
    start, end, _ = _slice_bounds(n.inputs[0].type.shape[d], n.attrs["start"], n.attrs["end"], n.attrs["step"])
    return f.emit(
        relax.op.strided_slice(
            xs[0],
            [d],
            [tir_dim(sympy.sympify(start), f.env)],
            [tir_dim(sympy.sympify(end), f.env)],
            [n.attrs["step"]],
            assume_inbound=True,
        )
    )


@register_rule("relax", "cat")
def _cat(f, n, xs):
    return f.emit(relax.op.concat(xs, axis=n.attrs["dim"] % n.type.rank))


@register_rule("relax", "arange")
def _arange(f, n, xs):
    a = n.attrs
    return f.emit(
        relax.op.arange(
            tir_dim(sympy.sympify(a["start"]), f.env),
            tir_dim(sympy.sympify(a["end"]), f.env),
            a["step"],
            dtype=n.type.dtype,
        )
    )


@register_rule("relax", "full")
def _full(f, n, xs):
    return f.emit(
        relax.op.full(f.dims(n.type.shape), relax.const(np.array(n.attrs["value"], n.type.dtype)), n.type.dtype)
    )


@register_rule("relax", "rms_norm")
def _rms_norm(f, n, xs):
    x, w = xs
    ms = f.emit(relax.op.mean(f.emit(relax.op.multiply(x, x)), axis=[-1], keepdims=True))
    r = f.emit(relax.op.rsqrt(f.emit(relax.op.add(ms, relax.const(np.float32(n.attrs["eps"]))))))
    return f.emit(relax.op.multiply(f.emit(relax.op.multiply(x, r)), w))


@register_rule("relax", "layer_norm")
def _layer_norm(f, n, xs):
    nd = n.attrs["ndim"]
    shape = [int(d) for d in n.type.shape[-nd:]]
    _, w, b = OPS["layer_norm"].padded(xs)
    gamma = w if w is not None else relax.const(np.ones(shape, "float32"))
    beta = b if b is not None else relax.const(np.zeros(shape, "float32"))
    return f.emit(relax.op.nn.layer_norm(xs[0], gamma, beta, axes=list(range(-nd, 0)), epsilon=n.attrs["eps"]))


@register_rule("relax", "rope")
def _rope(f, n, xs):
    x, cos, sin = xs
    rank = n.type.rank
    d = int(n.inputs[0].type.shape[-1])
    lo = f.emit(relax.op.strided_slice(x, [rank - 1], [0], [d // 2], assume_inbound=True))
    hi = f.emit(relax.op.strided_slice(x, [rank - 1], [d // 2], [d], assume_inbound=True))
    rot = f.emit(relax.op.concat([f.emit(relax.op.negative(hi)), lo], axis=rank - 1))
    return f.emit(relax.op.add(f.emit(relax.op.multiply(x, cos)), f.emit(relax.op.multiply(rot, sin))))


@register_rule("relax", "quant_act")
def _quant_act(f, n, xs):
    # Per-token int8 round trip of the activations; the int8 weights then run through the weight-only
    # kernel. Numerically this is W8A8 (int8 x int8 products are exact in fp32); a VNNI int8 GEMM
    # that would also make it faster is not written yet.
    x = xs[0]
    amax = f.emit(relax.op.max(f.emit(relax.op.abs(x)), axis=[-1], keepdims=True))
    s = f.emit(
        relax.op.divide(f.emit(relax.op.maximum(amax, relax.const(np.float32(1e-8)))), relax.const(np.float32(127.0)))
    )
    q = f.emit(relax.op.clip(f.emit(relax.op.round(f.emit(relax.op.divide(x, s)))), -127, 127))
    return f.emit(relax.op.multiply(q, s))


@register_rule("relax", "embedding")
def _embedding(f, n, xs):
    # mode=clip: TVM's default 'fast' warns on stderr at every build; ids are range-checked at the engine's door
    return f.emit(relax.op.take(xs[0], xs[1], axis=0, mode="clip"))


@register_rule("relax", "linear")
def _linear(f, n, xs):
    w = n.inputs[1]
    group = f.low.siblings.get(n)
    if group is None:
        return f.low.linear(f, xs[0], n.inputs[0].type.shape[:-1], (w,), int(w.type.shape[0]), f.bias(n))
    # one kernel over the stacked weights of the group, run when its first member is reached
    key = ("siblings", group[0])
    if key not in f.values:
        ws = tuple(g.inputs[1] for g in group)
        parts = tuple(int(g.inputs[1].type.shape[0]) for g in group)
        lead = n.inputs[0].type.shape[:-1]
        f.values[key] = f.low.linear_parts(f, xs[0], lead, ws, parts, f.group_bias(group))
    return f.values[key][group.index(n)]


@register_rule("relax", "gated_mlp")
def _gated_mlp(f, n, xs):
    """down(act(gate(x)) * up(x)) with gate and up as one linear kernel over concatenated weights."""
    x, wg, wu, wd = n.inputs
    ffn = int(wg.type.shape[0])
    gu = f.low.linear(f, xs[0], x.type.shape[:-1], (wg, wu), 2 * ffn)
    rank = x.type.rank
    g = f.emit(relax.op.strided_slice(gu, [rank - 1], [0], [ffn], assume_inbound=True))
    u = f.emit(relax.op.strided_slice(gu, [rank - 1], [ffn], [2 * ffn], assume_inbound=True))
    act = {"silu": relax.op.nn.silu, "gelu": relax.op.nn.gelu, "gelu_tanh": relax.op.nn.gelu_tanh}[n.attrs["act"]]
    h = f.emit(relax.op.multiply(f.emit(act(g)), u))
    return f.low.linear(f, h, n.type.shape[:-1], (wd,), int(wd.type.shape[0]))


# -- collectives of a tensor-parallel rank (passes/shard_tensor_parallel.py) --------------------------
# The program calls the runtime, which does the exchange with the other ranks on the same stream as the
# kernels (runtime/collectives.py: NCCL on GPUs, shared memory between CPU processes).


@register_rule("relax", "all_reduce")
def _all_reduce(f, n, xs):
    return f.emit(relax.call_dps_packed("kiln.all_reduce", [xs[0]], f.ttype(n.type)))


@register_rule("relax", "all_gather")
def _all_gather(f, n, xs):
    """The runtime gathers the ranks' parts rank-major ([ranks, *x]); a permute and a reshape put them along
    `dim`."""
    x = n.inputs[0]
    ranks, rank = int(n.attrs["ranks"]), x.type.rank
    d = n.attrs["dim"] % rank
    parts = f.emit(
        relax.call_dps_packed(
            "kiln.all_gather", [xs[0]], relax.TensorType([ranks] + f.dims(x.type.shape), x.type.dtype)
        )
    )
    if d:
        parts = f.emit(relax.op.permute_dims(parts, list(range(1, d + 1)) + [0] + list(range(d + 1, rank + 1))))
    return f.emit(relax.op.reshape(parts, f.dims(n.type.shape)))
