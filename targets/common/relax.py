"""Generic lowering: optimized kiln IR -> TVM Relax functions with symbolic shapes, one per entry point.

`RelaxLowering` owns the IRModule under construction, the kernel cache and the weight plan; a target
subclasses it to say which rules it uses (`backends`, most specific first: cpu = ("cpu", "relax")),
how its weights are laid out (`weight_fields`) and how it stores the KV cache (`cache_dtype`).
Rules are registered on the op records (`kiln.ops.register_rule`): this module registers the
"relax" rules that any TVM target can use (elementwise, shape ops, norms, rotary); the targets
register their kernels' rules under their own name.

Weights are not baked into the module: every entry point takes one tuple `weights` whose fields are
listed by `WeightSpec`s (a parameter, possibly packed or concatenated for a kernel), bound at load
time. Each KV-cache layer is a separate tensor in the tuple `kv_caches`, updated in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import sympy
import tvm
from tvm import relax, tirx

from kiln.dims import DimError, eval_dim
from kiln.entry import EntryPoint
from kiln.errors import UnsupportedOpError
from kiln.ir import Graph, Node
from kiln.ops import OPS, find_rule, register_rule
from kiln.targets.base import WeightSpec

from .layouts import CAT, RAW, Layout

DIM_SYMBOLS = ("batch", "tokens", "pages", "max_pages")


def tir_dim(e: sympy.Expr, env: dict[str, Any]):
    """sympy dim -> TIR expression, symbols looked up by name in env."""
    try:
        return eval_dim(e, env, const=lambda v: tirx.IntImm("int64", v), floordiv=tirx.floordiv)
    except DimError as err:
        raise NotImplementedError(f"dimension expression {e} has no TIR form ({err})") from None


def qkey(w: Node) -> tuple[int, int, bool]:
    """(bits, group, sym) of a qweight node."""
    return (w.attrs["bits"], w.attrs["group"], w.attrs["sym"])


class FunctionLowering:
    """Lowers one graph into one Relax function for one entry point."""

    def __init__(self, low: RelaxLowering, entry: EntryPoint) -> None:
        self.low, self.entry, self.fname, self.bind = low, entry, entry.name, entry.dims
        self.bb = low.bb
        self.env: dict[str, Any] = {}
        self.values: dict[Any, relax.Expr] = {}
        # decode (one token per sequence) runs matrix-vector kernels unless the entry asks for GEMMs
        self.mode = "gemv" if entry.dims.get("tokens") == 1 and not entry.gemm else "gemm"

    def dims(self, shape) -> list:
        return [tir_dim(d, self.env) for d in shape]

    def ttype(self, t) -> relax.TensorType:
        return relax.TensorType(self.dims(t.shape), t.dtype)

    def cache_type(self, c: Node) -> relax.TensorType:
        """A KV-cache input's type: the target may store the cache narrower than the IR's float32."""
        dt = self.low.cache_dtype if c.type.dtype == "float32" and self.low.cache_dtype else c.type.dtype
        return relax.TensorType(self.dims(c.type.shape), dt)

    def build(self) -> None:
        g = self.low.graph
        for s in DIM_SYMBOLS:
            self.env[s] = tirx.IntImm("int64", self.bind[s]) if s in self.bind else tirx.Var(s, "int64")
        ins = [relax.Var(n.name, self.ttype(n.type)) for n in g.inputs if not n.name.startswith("kv_cache_")]
        caches = [n for n in g.inputs if n.name.startswith("kv_cache_")]
        cache_var = relax.Var("kv_caches", relax.TupleType([self.cache_type(c) for c in caches]))
        wvar = relax.Var(
            "weights", relax.TupleType([relax.TensorType(list(s.shape), s.dtype) for s in self.low.weight_specs])
        )
        self.wvar = wvar
        bb = self.bb
        with bb.function(self.fname, ins + [cache_var, wvar]):
            with bb.dataflow():
                it = iter(ins)
                for n in g.inputs:
                    if n.name.startswith("kv_cache_"):
                        self.values[n] = bb.emit(relax.TupleGetItem(cache_var, caches.index(n)))
                    else:
                        self.values[n] = next(it)
                for n in g.nodes:
                    if n.op in ("input", "param", "qweight") or n in self.values:
                        continue  # parameters are read on first use, in the layout the use needs
                    self.values[n] = self.lower_node(n)
                outs = [self.values[o] for o in g.outputs]
                out = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
            bb.emit_func_output(out)

    def weight(self, spec_name: str) -> relax.Expr:
        key = ("w", spec_name)
        if key not in self.values:
            idx = self.low.weight_index[spec_name]
            self.values[key] = self.bb.emit(relax.TupleGetItem(self.wvar, idx))
        return self.values[key]

    def fields(self, *ws: Node) -> list[relax.Expr]:
        """The weight fields a kernel reads for weights `ws` (see `RelaxLowering.weight_fields`)."""
        return [self.weight(x) for x in self.low.weight_fields(*ws)]

    def bias(self, n: Node) -> relax.Expr | None:
        """A linear node's bias field, or None."""
        b = n.input("bias")
        return None if b is None else self.weight(self.low.spec_name((b.attrs["name"],), RAW))

    def group_bias(self, group: tuple[Node, ...]) -> relax.Expr | None:
        """The concatenated bias field of sibling linears (see `RelaxLowering.sibling_groups`), or None."""
        biases = group_biases(group)
        if biases is None:
            return None
        return self.weight(self.low.spec_name(tuple(b.attrs["name"] for b in biases), CAT))

    def lower_node(self, n: Node) -> relax.Expr:
        fn = find_rule(n.op, self.low.backends)
        if fn is None:
            raise UnsupportedOpError(
                n.op if n.op != "aten" else str(n.attrs["fn"]),
                n.source,
                hint=f"target '{self.low.target_name}' has no lowering for it; a pass should "
                "have replaced it (for attention: is its mask causal?)",
            )
        return fn(self, n, [self.value(i) for i in n.inputs])

    def value(self, i: Node) -> relax.Expr | None:
        if i.op == "qweight":
            return None  # consumed inside the consumer's kernel
        if i.op == "param":
            raw = self.low.spec_name((i.attrs["name"],), RAW)
            return self.weight(raw) if raw in self.low.weight_index else None
        return self.values[i]

    def emit(self, expr) -> relax.Expr:
        return self.bb.emit(expr)

    def rows(self, x: relax.Expr, shape) -> tuple[list, Any]:
        """The leading dims of `x` [..., k] and their product (the rows of a GEMM). Taken from the Relax
        value, not the IR type: the verify entry point keeps all tokens where the IR's last-token slice
        says 1."""
        lead = list(x.ty.shape.values)[:-1] if hasattr(x, "ty") and x.ty.shape is not None else self.dims(shape)
        m = lead[0]
        for d in lead[1:]:
            m = m * d
        return lead, m


class RelaxLowering:
    """Owns the IRModule under construction, the kernel cache and the weight plan of one graph."""

    backends: tuple[str, ...] = ("relax",)  # rule lookup order, most specific first
    cache_dtype: str | None = None  # the KV cache's storage dtype, when narrower than the IR's
    fuse_siblings: bool = False  # linears that read the same activations run as one kernel (q, k, v)

    def __init__(self, graph: Graph, target_name: str) -> None:
        self.graph = graph
        self.target_name = target_name
        self.bb = relax.BlockBuilder()
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.weight_specs: list[WeightSpec] = []
        self.weight_index: dict[str, int] = {}
        self.siblings = self.sibling_groups() if self.fuse_siblings else {}
        self._plan_weights()

    def sibling_groups(self) -> dict[Node, tuple[Node, ...]]:
        """Linears that read the same activations with weights one kernel can stack along its output rows,
        each mapped to its group (in graph order). At decode, q, k and v as one GEMV stream their weights at
        the rate of a large kernel instead of three small ones (k and v alone leave most of a GPU idle)."""
        groups: dict[tuple, list[Node]] = {}
        for n in self.graph.nodes:
            if n.op == "linear":
                w = n.inputs[1]
                kind = qkey(w) if w.op == "qweight" else (w.op, w.type.dtype)
                key = (n.inputs[0], kind, int(w.type.shape[1]), n.input("bias") is not None)
                groups.setdefault(key, []).append(n)
        return {n: tuple(g) for g in groups.values() if len(g) > 1 for n in g}

    def _plan_weights(self) -> None:
        """Decide each parameter's layout from how the graph uses it (one field per layout)."""
        for n in self.graph.nodes:
            if n.op == "linear":
                group = self.siblings.get(n, (n,))
                if n is not group[0]:
                    continue  # planned with the group's first
                self.weight_fields(*(g.inputs[1] for g in group))
                biases = group_biases(group)
                if biases is not None and len(group) > 1:
                    b_names = tuple(b.attrs["name"] for b in biases)
                    self.register(b_names, CAT, (sum(int(b.type.shape[0]) for b in biases),), biases[0].type.dtype)
                elif biases is not None:
                    self.add_raw(biases[0])
            elif n.op == "gated_mlp":
                self.weight_fields(n.inputs[1], n.inputs[2])
                self.weight_fields(n.inputs[3])
            elif n.op == "qweight":
                continue  # read by its consumer's kernel, never materialized
            elif n.op == "embedding" and self.plan_embedding(n):
                continue
            else:
                for i in n.inputs:
                    if i.op == "param":
                        self.add_raw(i)

    def plan_embedding(self, n: Node) -> bool:
        """Give an embedding's table its field, if it needs a layout of its own; False: plain params."""
        return False

    def weight_fields(self, *ws: Node) -> list[str]:
        """Fields for a linear kernel's weights (several are concatenated along the output dim)."""
        raise NotImplementedError

    def linear(
        self,
        f: FunctionLowering,
        x: relax.Expr,
        lead_shape,
        ws: tuple[Node, ...],
        n_out: int,
        bias: relax.Expr | None = None,
    ) -> relax.Expr:
        """x [..., k] -> [..., n_out] through the target's linear kernel over weights `ws` (concatenated
        along the output rows); the generic `linear` and `gated_mlp` rules call it."""
        raise NotImplementedError

    def linear_parts(
        self,
        f: FunctionLowering,
        x: relax.Expr,
        lead_shape,
        ws: tuple[Node, ...],
        parts: tuple[int, ...],
        bias: relax.Expr | None = None,
    ) -> list[relax.Expr]:
        """Stacked linears (`sibling_groups`): one kernel over all of `ws`, one output per weight."""
        return split_rows(f, self.linear(f, x, lead_shape, ws, sum(parts), bias), parts)

    def spec_name(self, sources: tuple[str, ...], layout: Layout) -> str:
        return "+".join(sources) + ("" if layout == RAW else f"@{layout.key()}")

    def add_raw(self, p: Node) -> str:
        return self.register((p.attrs["name"],), RAW, tuple(int(d) for d in p.type.shape), p.type.dtype)

    def register(self, sources: tuple[str, ...], layout: Layout, shape: tuple[int, ...], dtype: str) -> str:
        """A weight field (once per sources and layout); returns its name."""
        name = self.spec_name(sources, layout)
        if name not in self.weight_index:
            self.weight_index[name] = len(self.weight_specs)
            self.weight_specs.append(
                WeightSpec(name, tuple(sources), layout.key(), tuple(int(s) for s in shape), dtype)
            )
        return name

    def kernel(self, key: tuple, make: Callable[[], tirx.PrimFunc]) -> tvm.ir.GlobalVar:
        if key not in self.kernels:
            name = "_".join(str(k).replace(".", "p").replace("-", "m") for k in key)
            func = make().with_attr("op_pattern", 8).with_attr("global_symbol", name)  # opaque: hand-scheduled
            self.kernels[key] = self.bb.add_func(func, name)
        return self.kernels[key]

    def lower(self, entry_points: dict[str, EntryPoint]) -> tvm.IRModule:
        for e in entry_points.values():
            FunctionLowering(self, e).build()
        return self.bb.get()


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


def group_biases(group: tuple[Node, ...]) -> list[Node] | None:
    """The bias params of linears grouped by `sibling_groups` (all have one or none), or None."""
    biases = [g.input("bias") for g in group]
    return None if any(b is None for b in biases) else [b for b in biases if b is not None]


def split_rows(f: FunctionLowering, y: relax.Expr, parts: tuple[int, ...]) -> list[relax.Expr]:
    """y [..., sum(parts)] cut along its last axis."""
    axis = len(y.ty.shape.values) - 1 if y.ty.shape is not None else -1
    bounds = [sum(parts[:i]) for i in range(len(parts) + 1)]
    return [
        f.emit(relax.op.strided_slice(y, [axis], [lo], [hi], assume_inbound=True)) for lo, hi in zip(bounds, bounds[1:])
    ]


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
