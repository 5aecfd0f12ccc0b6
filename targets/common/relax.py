"""Lowering: optimized kiln IR -> TVM Relax functions with symbolic shapes, one per entry point.

Weights are not baked into the module: every entry point takes one tuple `weights` whose fields are
listed by `WeightSpec`s (a parameter, possibly packed or concatenated for a kernel), bound at load
time. Each KV-cache layer is a separate tensor in the tuple `kv_caches`, updated in place.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import sympy
import tvm
from tvm import relax, tirx

from kiln.errors import UnsupportedOpError
from kiln.ir import Graph, Node

from kiln.targets.cpu import kernels as K


@dataclass(frozen=True)
class WeightSpec:
    """One field of the `weights` tuple: made from graph parameters by a named transform."""
    name: str
    sources: tuple[str, ...]
    transform: str  # "raw" | "linear" (packed for the linear kernel) | "linear_cat" (concat rows, packed)
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _tir(e: sympy.Expr, env: dict[str, Any]):
    """sympy dim -> TIR expression, symbols looked up by name in env."""
    if e.is_Integer:
        return tirx.IntImm("int64", int(e))
    if e.is_Symbol:
        return env[e.name]
    if isinstance(e, sympy.Add):
        out = _tir(e.args[0], env)
        for a in e.args[1:]:
            out = out + _tir(a, env)
        return out
    if isinstance(e, sympy.Mul):
        out = _tir(e.args[0], env)
        for a in e.args[1:]:
            out = out * _tir(a, env)
        return out
    if isinstance(e, sympy.floor) and isinstance(e.args[0], sympy.Mul):
        num, den = e.args[0].as_numer_denom()
        return tirx.floordiv(_tir(num, env), _tir(den, env))
    raise NotImplementedError(f"dimension expression {e} has no TIR form")


def _qkey(w: Node) -> tuple:
    return (w.attrs["bits"], w.attrs["group"], w.attrs["sym"])


def _padded_k(k: int, group: int) -> int:
    """The kernels want whole groups: a ragged last group (576 with 128) is padded with zero weights,
    and the input with zeros to match."""
    return -(-k // group) * group


_QCACHE: dict = {}


def _pack(w, transform: str, key: tuple = ()):
    import numpy as np
    if transform.startswith("q"):
        # "q<bits>g<group><s|a>:<i>": sources are codes..., scales..., zeros... (one per concatenated weight)
        head, i = transform.split(":")
        bits, rest = head[1:].split("g")
        group, sym = int(rest[:-1]), rest[-1] == "s"
        key = (key, head)
        if key not in _QCACHE:
            from kiln.targets.cpu import qkernels as Q
            n = len(w) // 3
            cat = [np.concatenate(w[j * n:(j + 1) * n], axis=0) for j in range(3)]
            codes = cat[0].astype(np.int32)
            pad = _padded_k(codes.shape[1], group) - codes.shape[1]
            if pad:  # padded codes sit at the zero point of the last group: they dequantize to 0
                zero = np.round(cat[2][:, -1:]).astype(np.int32)
                cat[0] = np.concatenate([codes, np.repeat(zero, pad, axis=1)], axis=1)
            _QCACHE.clear()
            _QCACHE[key] = Q.pack_qweight(cat[0].astype(np.int32), cat[1], None if sym else cat[2], int(bits), group, sym)
        return _QCACHE[key][int(i)]
    if transform.startswith("cuda_"):
        from kiln.targets.cuda.target import pack_cuda
        return pack_cuda(w, transform, key)
    if transform == "raw":
        return w[0]
    if transform == "linear":
        return K.pack_linear_weight(w[0])
    if transform == "linear_cat":
        return K.pack_linear_weight(np.concatenate(w, axis=0))
    raise ValueError(transform)


def materialize(spec: WeightSpec, params: dict[str, Any]):
    """Compute one weight field (numpy) from graph parameters (torch tensors)."""
    return _pack([params[s].detach().cpu().contiguous().numpy() for s in spec.sources], spec.transform, spec.sources)


class _FunctionLowering:
    """Lowers one graph into one Relax function for one binding of the symbolic dims."""

    def __init__(self, low: "Lowering", fname: str, bind: dict[str, int]) -> None:
        self.low, self.fname, self.bind = low, fname, bind
        self.bb = low.bb
        self.env: dict[str, Any] = {}
        self.values: dict[Node, relax.Expr] = {}
        self.mode = "gemv" if bind.get("tokens") == 1 and not bind.get("gemm") else "gemm"

    def dims(self, shape) -> list:
        return [_tir(d, self.env) for d in shape]

    def ttype(self, t) -> relax.TensorType:
        return relax.TensorType(self.dims(t.shape), t.dtype)

    def cache_type(self, c: Node) -> relax.TensorType:
        """A KV-cache input's type: the target may store the cache narrower than the IR's float32."""
        dt = self.low.cache_dtype if c.type.dtype == "float32" and self.low.cache_dtype else c.type.dtype
        return relax.TensorType(self.dims(c.type.shape), dt)

    def build(self) -> None:
        g = self.low.graph
        for s in ("batch", "tokens", "pages", "max_pages"):
            self.env[s] = tirx.IntImm("int64", self.bind[s]) if s in self.bind else tirx.Var(s, "int64")
        ins = [relax.Var(n.name, self.ttype(n.type)) for n in g.inputs if not n.name.startswith("kv_cache_")]
        caches = [n for n in g.inputs if n.name.startswith("kv_cache_")]
        cache_var = relax.Var("kv_caches", relax.TupleType([self.cache_type(c) for c in caches]))
        wvar = relax.Var("weights", relax.TupleType([relax.TensorType(list(s.shape), s.dtype)
                                                      for s in self.low.weight_specs]))
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

    def lower_node(self, n: Node) -> relax.Expr:
        fn = self.low.rules.get(n.op)
        if fn is None:
            raise UnsupportedOpError(n.op if n.op != "aten" else str(n.attrs["fn"]), n.source,
                                     hint=f"target '{self.low.target_name}' has no lowering for it; a pass should "
                                          "have replaced it (for attention: is its mask causal?)")
        return fn(self, n, [self.value(i) for i in n.inputs])

    def value(self, i: Node) -> relax.Expr | None:
        if i.op == "qweight":
            return None  # consumed inside the consumer's kernel
        if i.op == "param":
            raw = self.low.spec_name((i.attrs["name"],), "raw")
            return self.weight(raw) if raw in self.low.weight_index else None
        return self.values[i]

    def emit(self, expr) -> relax.Expr:
        return self.bb.emit(expr)


class Lowering:
    """Owns the IRModule under construction, the kernel cache and the weight layout."""

    # Targets other than cpu subclass this: their own rules (overriding LOWER per op), weight
    # layouts (_plan_weights / weight_fields) and KV-cache dtype.
    extra_rules: dict[str, Callable] = {}
    cache_dtype: str | None = None

    def __init__(self, graph: Graph, target_name: str = "cpu") -> None:
        self.graph = graph
        self.target_name = target_name
        self.rules = {**LOWER, **self.extra_rules}
        self.bb = relax.BlockBuilder()
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.weight_specs: list[WeightSpec] = []
        self.weight_index: dict[str, int] = {}
        self._plan_weights()

    def _plan_weights(self) -> None:
        """Decide each parameter's layout from how the graph uses it (one field per layout)."""
        g = self.graph
        for n in g.nodes:
            if n.op == "linear":
                self.weight_fields(n.inputs[1])
                if len(n.inputs) > 2:
                    self._add_spec(n.inputs[2], "raw")
            elif n.op == "gated_mlp":
                self.weight_fields(n.inputs[1], n.inputs[2])
                self.weight_fields(n.inputs[3])
            elif n.op == "qweight":
                continue  # read by its consumer's kernel, never materialized
            elif n.op == "embedding" and self._plan_embedding(n):
                continue
            else:
                for i in n.inputs:
                    if i.op == "param":
                        self._add_spec(i, "raw")

    def _plan_embedding(self, n: Node) -> bool:
        """Give an embedding's table its field, if it needs a layout of its own; False: plain params."""
        if n.inputs[0].op == "qweight":
            self.weight_fields(n.inputs[0])  # rows dequantized out of the packed layout
            return True
        return self._packed_too(n.inputs[0])  # a tied table reads its rows out of the LM head's layout

    def _packed_too(self, p: Node) -> bool:
        return p.op == "param" and any(u.op == "linear" and u.inputs[1] is p for u in self.graph.nodes)

    def weight_fields(self, *ws: Node) -> list[str]:
        """Fields for a linear kernel's weight: fp32 packed, or quantized codes/scales/zeros packed.
        Several weights (gate and up) are concatenated along the output dim into one kernel."""
        if all(w.op == "param" for w in ws):
            return [self._add_spec(ws[0], "linear") if len(ws) == 1 else self.linear_cat(*ws)]
        if all(w.op == "qweight" for w in ws) and len({_qkey(w) for w in ws}) == 1:
            from kiln.targets.cpu import qkernels as Q
            a = ws[0].attrs
            if a["bits"] not in (4, 8):
                raise UnsupportedOpError(f"qweight with {a['bits']}-bit codes", ws[0].source,
                                         hint=f"target '{self.target_name}' has int8 and int4 kernels; "
                                              f"{a['bits']}-bit schemes are for accuracy studies (interpreter) only")
            rows = sum(int(w.type.shape[0]) for w in ws)
            k = _padded_k(int(ws[0].type.shape[1]), a["group"])
            sources = tuple(f"{w.inputs[j].attrs['name']}" for j in range(3) for w in ws)
            names = []
            for i, (shape, dtype) in enumerate(Q.packed_shapes(rows, k, a["bits"], a["group"], a["sym"])):
                names.append(self._register(sources, f"q{a['bits']}g{a['group']}{'s' if a['sym'] else 'a'}:{i}",
                                            tuple(shape), dtype, packed=True))
            return names
        raise UnsupportedOpError("linear over a mix of quantized and fp32 or differently quantized weights",
                                 ws[0].source)

    def spec_name(self, sources: tuple[str, ...], transform: str) -> str:
        return "+".join(sources) + ("" if transform == "raw" else f"@{transform}")

    def _add_spec(self, p: Node, transform: str) -> str:
        return self._register((p.attrs["name"],), transform, tuple(int(d) for d in p.type.shape), p.type.dtype)

    def linear_cat(self, *ps: Node) -> str:
        rows = sum(int(p.type.shape[0]) for p in ps)
        return self._register(tuple(p.attrs["name"] for p in ps), "linear_cat", (rows, int(ps[0].type.shape[1])),
                              ps[0].type.dtype)

    def _register(self, sources, transform, logical_shape, dtype, packed: bool = False) -> str:
        name = self.spec_name(sources, transform)
        if name in self.weight_index:
            return name
        if transform == "raw" or packed:
            shape = logical_shape
        else:
            shape = ((logical_shape[0] + K.NB - 1) // K.NB, logical_shape[1], K.NB)  # see K.linear_weight_layout()
        self.weight_index[name] = len(self.weight_specs)
        self.weight_specs.append(WeightSpec(name, tuple(sources), transform, tuple(int(s) for s in shape), dtype))
        return name

    def kernel(self, key: tuple, make: Callable[[], tirx.PrimFunc]) -> tvm.ir.GlobalVar:
        if key not in self.kernels:
            name = "_".join(str(k).replace(".", "p").replace("-", "m") for k in key)
            func = make().with_attr("op_pattern", 8).with_attr("global_symbol", name)  # opaque: hand-scheduled
            self.kernels[key] = self.bb.add_func(func, name)
        return self.kernels[key]

    def lower(self, entry_points: dict[str, dict[str, int]]) -> tvm.IRModule:
        for fname, bind in entry_points.items():
            _FunctionLowering(self, fname, bind).build()
        return self.bb.get()


# -- per-op lowering rules -------------------------------------------------------------------------

LOWER: dict[str, Callable[[_FunctionLowering, Node, list], relax.Expr]] = {}


def _rule(*ops: str):
    def deco(fn):
        for o in ops:
            LOWER[o] = fn
        return fn
    return deco


@_rule("param")
def _param(f, n, xs):
    return f.weight(f.low.spec_name((n.attrs["name"],), "raw"))


@_rule("const")
def _const(f, n, xs):
    import numpy as np
    return relax.const(np.array(n.attrs["value"], dtype=n.type.dtype), n.type.dtype)


_BIN = {"add": relax.op.add, "sub": relax.op.subtract, "mul": relax.op.multiply, "div": relax.op.divide,
        "pow": relax.op.power, "maximum": relax.op.maximum, "minimum": relax.op.minimum, "eq": relax.op.equal,
        "ne": relax.op.not_equal, "lt": relax.op.less, "le": relax.op.less_equal, "gt": relax.op.greater,
        "ge": relax.op.greater_equal, "and": relax.op.logical_and, "or": relax.op.logical_or}
_UN = {"neg": relax.op.negative, "exp": relax.op.exp, "log": relax.op.log, "sqrt": relax.op.sqrt,
       "rsqrt": relax.op.rsqrt, "tanh": relax.op.tanh, "sigmoid": relax.op.sigmoid, "silu": relax.op.nn.silu,
       "relu": relax.op.nn.relu, "cos": relax.op.cos, "sin": relax.op.sin, "abs": relax.op.abs,
       "not": relax.op.logical_not, "erf": relax.op.erf}


def _operand(f, node: Node, x, dtype: str):
    return x if node.type.dtype == dtype else f.emit(relax.op.astype(x, dtype))


for _o, _fn in _BIN.items():
    LOWER[_o] = (lambda fn: lambda f, n, xs: f.emit(fn(*[_operand(f, i, x, n.type.dtype if n.type.dtype != "bool"
                                                                      else i.type.dtype) for i, x in zip(n.inputs, xs)])))(_fn)
for _o, _fn in _UN.items():
    LOWER[_o] = (lambda fn: lambda f, n, xs: f.emit(fn(xs[0])))(_fn)


@_rule("gelu")
def _gelu(f, n, xs):
    return f.emit((relax.op.nn.gelu_tanh if n.attrs.get("approximate") == "tanh" else relax.op.nn.gelu)(xs[0]))


@_rule("cast")
def _cast(f, n, xs):
    return f.emit(relax.op.astype(xs[0], n.type.dtype))


@_rule("where")
def _where(f, n, xs):
    return f.emit(relax.op.where(xs[0], _operand(f, n.inputs[1], xs[1], n.type.dtype),
                                 _operand(f, n.inputs[2], xs[2], n.type.dtype)))


@_rule("sum", "mean", "amax", "amin")
def _reduce(f, n, xs):
    fn = {"sum": relax.op.sum, "mean": relax.op.mean, "amax": relax.op.max, "amin": relax.op.min}[n.op]
    return f.emit(fn(xs[0], axis=list(n.attrs["dims"]), keepdims=bool(n.attrs.get("keepdim"))))


@_rule("softmax")
def _softmax(f, n, xs):
    return f.emit(relax.op.nn.softmax(xs[0], axis=n.attrs["dim"]))


@_rule("matmul")
def _matmul(f, n, xs):
    return f.emit(relax.op.matmul(xs[0], xs[1]))


@_rule("reshape")
def _reshape(f, n, xs):
    return f.emit(relax.op.reshape(xs[0], f.dims(n.type.shape)))


@_rule("unsqueeze")
def _unsqueeze(f, n, xs):
    return f.emit(relax.op.expand_dims(xs[0], [n.attrs["dim"]]))


@_rule("squeeze")
def _squeeze(f, n, xs):
    return f.emit(relax.op.squeeze(xs[0], [n.attrs["dim"]]))


@_rule("permute")
def _permute(f, n, xs):
    return f.emit(relax.op.permute_dims(xs[0], list(n.attrs["perm"])))


@_rule("expand")
def _expand(f, n, xs):
    return f.emit(relax.op.broadcast_to(xs[0], f.dims(n.type.shape)))


@_rule("slice")
def _slice(f, n, xs):
    from kiln.ops import _slice_bounds
    if n.attrs.get("last_token") and f.bind.get("all_logits"):
        return xs[0]  # verify entry point: logits for every token
    d = n.attrs["dim"] % n.type.rank
    start, end, _ = _slice_bounds(n.inputs[0].type.shape[d], n.attrs["start"], n.attrs["end"], n.attrs.get("step", 1))
    return f.emit(relax.op.strided_slice(xs[0], [d], [_tir(sympy.sympify(start), f.env)],
                                         [_tir(sympy.sympify(end), f.env)], [n.attrs.get("step", 1)],
                                         assume_inbound=True))


@_rule("cat")
def _cat(f, n, xs):
    return f.emit(relax.op.concat(xs, axis=n.attrs["dim"] % n.type.rank))


@_rule("arange")
def _arange(f, n, xs):
    a = n.attrs
    return f.emit(relax.op.arange(_tir(sympy.sympify(a["start"]), f.env), _tir(sympy.sympify(a["end"]), f.env),
                                  a.get("step", 1), dtype=n.type.dtype))


@_rule("full")
def _full(f, n, xs):
    import numpy as np
    return f.emit(relax.op.full(f.dims(n.type.shape), relax.const(np.array(n.attrs["value"], n.type.dtype)),
                                n.type.dtype))


def _qembedding(f, n, xs):
    """Rows of a quantized table, dequantized out of the linear kernels' packed layout."""
    from tvm import te

    from kiln.targets.cpu import qkernels as Q
    w = n.inputs[0]
    bits, group, sym = _qkey(w)
    d = int(w.type.shape[1])
    fields = [f.weight(x) for x in f.low.weight_fields(w)]
    a, b = Q._deq_ab(bits)
    symc = Q._sym_c(bits)
    nb, hb = K.NB, K.NB // 2

    def gather(idx, codes, scales, *zs):
        def row(*i):
            v, k = idx[i[:-1]], i[-1]
            blk, lane = v // nb, v % nb
            if bits == 8:
                c = codes[blk, k, lane].astype("float32")
            else:
                byte = codes[blk, k, lane % hb].astype("int32")
                c = tvm.tirx.if_then_else(lane < hb, byte & 15, byte >> 4).astype("float32")
            fval = c if (a, b) == (1.0, 0.0) else (c / a + b)
            sc = scales[blk, k // group, lane]
            return (fval - symc) * sc if sym else fval * sc + zs[0][blk, k // group, lane]
        return te.compute(tuple(idx.shape) + (d,), row, name="embedding_dequant")
    return f.bb.emit_te(gather, xs[1], *fields)


@_rule("embedding")
def _embedding(f, n, xs):
    w, ids = n.inputs
    if w.op == "qweight":
        return _qembedding(f, n, xs)
    if f.low._packed_too(w):
        from tvm import te
        packed = f.weight(f.low.weight_fields(w)[0])  # [ceil(V/NB), D, NB]
        nb = K.NB

        def gather(wp, idx):
            # rows of W[V, D] out of the packed [V/NB, D, NB] layout
            return te.compute(tuple(idx.shape) + (wp.shape[1],),
                              lambda *i: wp[idx[i[:-1]] // nb, i[-1], idx[i[:-1]] % nb], name="embedding_packed")
        return f.bb.emit_te(gather, packed, xs[1])
    return f.emit(relax.op.take(xs[0], xs[1], axis=0))


def linear_call(f: _FunctionLowering, x: relax.Expr, x_node_shape, specs: list[str], k: int, n_out: int,
                bias: relax.Expr | None, q: tuple | None = None) -> relax.Expr:
    """x [..., k] -> [..., n_out] through the packed-weight kernel (rows flattened to m)."""
    # Leading dims from the Relax value, not the IR type: the verify entry point keeps all tokens
    # where the IR's last-token slice says 1.
    lead = list(x.ty.shape.values)[:-1] if hasattr(x, "ty") and x.ty.shape is not None else f.dims(x_node_shape[:-1])
    m = lead[0]
    for d in lead[1:]:
        m = m * d
    x2 = f.emit(relax.op.reshape(x, [m, k]))
    if q is not None and _padded_k(k, q[1]) != k:
        pad = _padded_k(k, q[1]) - k
        x2 = f.emit(relax.op.nn.pad(x2, [0, 0, 0, pad]))
        k = k + pad
    if q is None:
        gv = f.low.kernel(("linear", k, n_out, bias is not None, f.mode),
                          lambda: K.linear_func(k, n_out, bias is not None, f.mode))
    else:
        from kiln.targets.cpu import qkernels as Q
        bits, group, sym = q
        gv = f.low.kernel(("qlinear", k, n_out, bits, group, "sym" if sym else "asym", bias is not None, f.mode),
                          lambda: Q.qlinear_func(k, n_out, bits, group, sym, bias is not None, f.mode))
    args = [x2] + [f.weight(s) for s in specs] + ([bias] if bias is not None else [])
    y = f.emit(relax.call_tir(gv, args, relax.TensorType([m, n_out], "float32")))
    return f.emit(relax.op.reshape(y, lead + [n_out]))


@_rule("linear")
def _linear(f, n, xs):
    w = n.inputs[1]
    bias = f.weight(f.low.spec_name((n.inputs[2].attrs["name"],), "raw")) if len(n.inputs) > 2 else None
    return linear_call(f, xs[0], n.inputs[0].type.shape, f.low.weight_fields(w), int(w.type.shape[1]),
                       int(w.type.shape[0]), bias, _qkey(w) if w.op == "qweight" else None)


@_rule("gated_mlp")
def _gated_mlp(f, n, xs):
    x, wg, wu, wd = n.inputs
    ffn, d = int(wg.type.shape[0]), int(wg.type.shape[1])
    gu = linear_call(f, xs[0], x.type.shape, f.low.weight_fields(wg, wu), d, 2 * ffn, None,
                     _qkey(wg) if wg.op == "qweight" else None)
    rank = x.type.rank
    g = f.emit(relax.op.strided_slice(gu, [rank - 1], [0], [ffn], assume_inbound=True))
    u = f.emit(relax.op.strided_slice(gu, [rank - 1], [ffn], [2 * ffn], assume_inbound=True))
    act = {"silu": relax.op.nn.silu, "gelu": relax.op.nn.gelu, "gelu_tanh": relax.op.nn.gelu_tanh}[n.attrs["act"]]
    h = f.emit(relax.op.multiply(f.emit(act(g)), u))
    return linear_call(f, h, n.type.shape[:-1] + (ffn,), f.low.weight_fields(wd), ffn, int(wd.type.shape[0]), None,
                       _qkey(wd) if wd.op == "qweight" else None)


@_rule("rms_norm")
def _rms_norm(f, n, xs):
    import numpy as np
    x, w = xs
    ms = f.emit(relax.op.mean(f.emit(relax.op.multiply(x, x)), axis=[-1], keepdims=True))
    r = f.emit(relax.op.rsqrt(f.emit(relax.op.add(ms, relax.const(np.float32(n.attrs["eps"]))))))
    return f.emit(relax.op.multiply(f.emit(relax.op.multiply(x, r)), w))


@_rule("layer_norm")
def _layer_norm(f, n, xs):
    import numpy as np
    nd = n.attrs.get("ndim", 1)
    shape = [int(d) for d in n.type.shape[-nd:]]
    gamma = xs[1] if len(xs) > 1 else relax.const(np.ones(shape, "float32"))
    beta = xs[2] if len(xs) > 2 else relax.const(np.zeros(shape, "float32"))
    return f.emit(relax.op.nn.layer_norm(xs[0], gamma, beta, axes=list(range(-nd, 0)), epsilon=n.attrs["eps"]))


@_rule("rope")
def _rope(f, n, xs):
    x, cos, sin = xs
    rank = n.type.rank
    d = int(n.inputs[0].type.shape[-1])
    lo = f.emit(relax.op.strided_slice(x, [rank - 1], [0], [d // 2], assume_inbound=True))
    hi = f.emit(relax.op.strided_slice(x, [rank - 1], [d // 2], [d], assume_inbound=True))
    rot = f.emit(relax.op.concat([f.emit(relax.op.negative(hi)), lo], axis=rank - 1))
    return f.emit(relax.op.add(f.emit(relax.op.multiply(x, cos)), f.emit(relax.op.multiply(rot, sin))))


def _alibi_slopes(n: Node) -> relax.Expr | None:
    """ALiBi slopes [heads] of an attention node as a constant input of its kernel, or None."""
    import numpy as np
    if n.attrs.get("alibi") is None:
        return None
    return relax.const(np.asarray(n.attrs["alibi"], dtype="float32"), "float32")


@_rule("cached_attention")
def _cached_attention(f, n, xs):
    if len(xs) > 6:
        return _cached_attention_int8(f, n, xs)
    if n.attrs.get("kv_dtype"):
        raise UnsupportedOpError(f"cached_attention with a {n.attrs['kv_dtype']} KV cache", n.source,
                                 hint=f"target '{f.low.target_name}' has fp32 and int8 KV-cache kernels")
    q, k, v, cache, page_table, positions = xs
    qn, kn, _, cn = n.inputs[:4]
    heads, kv_heads, head_dim = int(qn.type.shape[1]), int(kn.type.shape[1]), int(kn.type.shape[3])
    page = int(cn.type.shape[3])
    perm = [0, 2, 1, 3]
    qt = f.emit(relax.op.permute_dims(q, perm))  # q: [B, T, H, D]
    kt = f.emit(relax.op.permute_dims(k, perm))  # k: [B, T, Hkv, D]
    vt = f.emit(relax.op.permute_dims(v, perm))
    append = f.low.kernel(("kv_append", kv_heads, head_dim, page), lambda: K.kv_append_func(kv_heads, head_dim, page))
    cache2 = f.emit(relax.op.call_tir_inplace(append, [cache, kt, vt, page_table, positions], [0],
                                              f.ttype(cn.type)))
    scale, window = float(n.attrs["scale"]), int(n.attrs.get("window", 0))
    slopes = _alibi_slopes(n)
    attn = f.low.kernel(("paged_attention", heads, kv_heads, head_dim, page, window, f"{scale:.6g}")
                        + (("alibi",) if slopes is not None else ()),
                        lambda: K.paged_attention_func(heads, kv_heads, head_dim, page, scale, window,
                                                       alibi=slopes is not None))
    b, t = f.dims(qn.type.shape[:1])[0], f.dims(qn.type.shape[2:3])[0]
    o = f.emit(relax.call_tir(attn, [qt, cache2, page_table, positions] + ([slopes] if slopes is not None else []),
                              relax.TensorType([b, t, heads, head_dim], "float32")))
    return f.emit(relax.op.permute_dims(o, perm))  # back to [B, H, T, D]


@_rule("quant_act")
def _quant_act(f, n, xs):
    # Per-token int8 round trip of the activations; the int8 weights then run through the weight-only
    # kernel. Numerically this is W8A8 (int8 x int8 products are exact in fp32); a VNNI int8 GEMM
    # that would also make it faster is not written yet.
    import numpy as np
    x = xs[0]
    amax = f.emit(relax.op.max(f.emit(relax.op.abs(x)), axis=[-1], keepdims=True))
    s = f.emit(relax.op.divide(f.emit(relax.op.maximum(amax, relax.const(np.float32(1e-8)))),
                               relax.const(np.float32(127.0))))
    q = f.emit(relax.op.clip(f.emit(relax.op.round(f.emit(relax.op.divide(x, s)))), -127, 127))
    return f.emit(relax.op.multiply(q, s))


def _cached_attention_int8(f, n, xs):
    from kiln.targets.cpu import kv8 as cpu_kv8
    q, k, v, cache, page_table, positions, scales = xs
    qn, kn, _, cn = n.inputs[:4]
    heads, kv_heads, head_dim = int(qn.type.shape[1]), int(kn.type.shape[1]), int(kn.type.shape[3])
    page = int(cn.type.shape[3])
    perm = [0, 2, 1, 3]
    qt, kt, vt = (f.emit(relax.op.permute_dims(x, perm)) for x in (q, k, v))
    append = f.low.kernel(("kv_append_int8", kv_heads, head_dim, page),
                          lambda: cpu_kv8.kv_append_int8_func(kv_heads, head_dim, page))
    both = f.emit(relax.op.call_tir_inplace(append, [cache, scales, kt, vt, page_table, positions], [0, 1],
                                            [f.ttype(cn.type), f.ttype(n.inputs[6].type)]))
    cache2 = f.emit(relax.TupleGetItem(both, 0))
    scales2 = f.emit(relax.TupleGetItem(both, 1))
    scale, window = float(n.attrs["scale"]), int(n.attrs.get("window", 0))
    slopes = _alibi_slopes(n)
    attn = f.low.kernel(("paged_attention_int8", heads, kv_heads, head_dim, page, window, f"{scale:.6g}")
                        + (("alibi",) if slopes is not None else ()),
                        lambda: cpu_kv8.paged_attention_int8_func(heads, kv_heads, head_dim, page, scale, window,
                                                                  alibi=slopes is not None))
    b, t = f.dims(qn.type.shape[:1])[0], f.dims(qn.type.shape[2:3])[0]
    o = f.emit(relax.call_tir(attn, [qt, cache2, scales2, page_table, positions]
                              + ([slopes] if slopes is not None else []),
                              relax.TensorType([b, t, heads, head_dim], "float32")))
    return f.emit(relax.op.permute_dims(o, perm))


@_rule("cached_mla_attention")
def _cached_mla_attention(f, n, xs):
    """Latent attention with absorbed up-projections (targets/cpu_mla.py): q_lat = q_nope W_uk per head,
    attention over the cached latents, then out = o_lat W_uv^T."""
    from kiln.targets.cpu import mla as cpu_mla
    if n.attrs.get("alibi") is not None:
        raise UnsupportedOpError("cached_mla_attention with ALiBi", n.source,
                                 hint="convert-mla keeps RoPE; ALiBi models are not converted to MLA")
    q_nope, q_rope, c, k_rope, w_uk, w_uv, cache, page_table, positions = xs
    qn, rn, cn, kn, _, vn, cachen = n.inputs[:7]
    heads, kvh = int(qn.type.shape[1]), int(kn.type.shape[1])
    dn, rd, rank, dv = int(qn.type.shape[3]), int(rn.type.shape[3]), int(cn.type.shape[-1]), int(vn.type.shape[1])
    page = int(cachen.type.shape[1])
    b, t = f.dims(qn.type.shape[:1])[0], f.dims(qn.type.shape[2:3])[0]
    rep = heads // kvh
    perm = [0, 2, 1, 3]
    if dn:
        uk = f.emit(relax.op.repeat(w_uk, rep, axis=0)) if rep > 1 else w_uk  # [H, Dn, r]
        q_lat = f.emit(relax.op.permute_dims(f.emit(relax.op.matmul(q_nope, uk)), perm))  # [B, T, H, r]
    else:
        q_lat = f.emit(relax.op.zeros([b, t, heads, rank], "float32"))
    qr = f.emit(relax.op.permute_dims(q_rope, perm))  # [B, T, H, R]
    kr = f.emit(relax.op.reshape(f.emit(relax.op.permute_dims(k_rope, perm)), [b, t, kvh * rd]))
    rows = f.emit(relax.op.concat([c, kr], axis=2))  # [B, T, r + Hkv*R]
    width = rank + kvh * rd
    append = f.low.kernel(("mla_append", width, page), lambda: cpu_mla.mla_append_func(width, page))
    cache2 = f.emit(relax.op.call_tir_inplace(append, [cache, rows, page_table, positions], [0],
                                              f.ttype(cachen.type)))
    scale, window = float(n.attrs["scale"]), int(n.attrs.get("window", 0))
    attn = f.low.kernel(("paged_mla_attention", heads, kvh, rank, rd, page, window, f"{scale:.6g}"),
                        lambda: cpu_mla.paged_mla_attention_func(heads, kvh, rank, rd, page, scale, window))
    o_lat = f.emit(relax.call_tir(attn, [q_lat, qr, cache2, page_table, positions],
                                  relax.TensorType([b, t, heads, rank], "float32")))
    uv = f.emit(relax.op.repeat(w_uv, rep, axis=0)) if rep > 1 else w_uv  # [H, Dv, r]
    return f.emit(relax.op.matmul(f.emit(relax.op.permute_dims(o_lat, perm)),
                                  f.emit(relax.op.permute_dims(uv, [0, 2, 1]))))  # [B, H, T, Dv]
