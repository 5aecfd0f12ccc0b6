"""Generic lowering: optimized kiln IR -> TVM Relax functions with symbolic shapes, one per entry point.

`RelaxLowering` owns the IRModule under construction, the kernel cache and the weight plan; a target
subclasses it to say which rules it uses (`backends`, most specific first: cpu = ("cpu", "relax")),
how its weights are laid out (`weight_fields`) and how it stores the KV cache (`cache_dtype`).
Rules are registered on the op records (`kiln.ops.register_rule`): `relax_rules.py` holds the
"relax" rules that any TVM target can use (elementwise, shape ops, norms, rotary, linears); the targets
register their kernels' rules under their own name.

Weights are not baked into the module: every entry point takes one tuple `weights` whose fields are
listed by `WeightSpec`s (a parameter, possibly packed or concatenated for a kernel), bound at load
time. Each KV-cache layer is a separate tensor in the tuple `kv_caches`, updated in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy
import tvm
from tvm import relax, tirx

from kiln.dims import DimError, eval_dim
from kiln.entry import EntryPoint
from kiln.errors import UnsupportedOpError
from kiln.ir import Graph, Node
from kiln.ops import find_rule
from kiln.targets.base import WeightSpec

from .layouts import CAT, RAW, Layout

DIM_SYMBOLS = ("batch", "tokens", "pages", "max_pages", "slots")


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


# the generic rules register themselves on the op records when their module loads
from . import relax_rules  # noqa: E402, F401
