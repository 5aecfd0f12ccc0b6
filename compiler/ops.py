"""The kiln op set: type inference and a torch-eager reference implementation for every op.

Each op is one `OpDef`: how its output type follows from its inputs, and what it computes (the
reference interpreter calls `ref`). Core ops mirror tensor algebra; LLM-level ops (`rms_norm`,
`rope`, `attention`, `gated_mlp`, `cached_attention`) are created by recognizer passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import sympy
import torch
import torch.nn.functional as F

from .ir import Node, TensorType, dim

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
           torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.int8: "int8",
           torch.uint8: "uint8", torch.bool: "bool"}
_TORCH = {v: k for k, v in _DTYPES.items()}


def torch_dtype_name(dt: torch.dtype) -> str:
    return _DTYPES[dt]


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH[name]


class ShapeError(ValueError):
    """A node's inputs do not fit together."""


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: Callable[[list[Node], dict], TensorType]
    ref: Callable[..., torch.Tensor]  # ref(ctx, inputs: list[Tensor], attrs) -> Tensor
    doc: str = ""
    # What each back end does with the op, registered by the back end itself (see `register_rule`):
    # "relax" (generic TVM lowering), "cpu", "cuda" (target lowerings), "mlir", "pim" (cost model), ...
    rules: dict[str, Callable] = field(default_factory=dict, compare=False)


OPS: dict[str, OpDef] = {}


def _op(name: str, infer, doc: str = ""):
    def deco(ref):
        OPS[name] = OpDef(name, infer, ref, doc)
        return ref
    return deco


def register_rule(backend: str, *ops: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as `backend`'s rule for each of `ops` (on the op's record)."""
    def deco(fn: Callable) -> Callable:
        for o in ops:
            if o not in OPS:
                raise KeyError(f"kiln has no op named '{o}' (registering a '{backend}' rule)")
            OPS[o].rules[backend] = fn
        return fn
    return deco


def find_rule(op: str, backends: Sequence[str]) -> Callable | None:
    """The first rule registered for `op` by one of `backends` (most specific first), or None."""
    rec = OPS.get(op)
    if rec is None:
        return None
    for b in backends:
        if b in rec.rules:
            return rec.rules[b]
    return None


def infer_type(op: str, inputs: list[Node], attrs: dict) -> TensorType:
    if op not in OPS:
        raise KeyError(f"kiln has no op named '{op}'")
    return OPS[op].infer(inputs, attrs)


# -- dimension helpers -------------------------------------------------------------------------

def same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return a == b or sympy.simplify(a - b) == 0


def broadcast_shapes(*shapes: tuple) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        d = sympy.Integer(1)
        for s in shapes:
            j = i - (rank - len(s))
            if j < 0:
                continue
            e = s[j]
            if e == 1:
                continue
            if d == 1:
                d = e
            elif not same(d, e):
                raise ShapeError(f"cannot broadcast {shapes}")
        out.append(d)
    return tuple(out)


def numel(shape: tuple) -> sympy.Expr:
    p = sympy.Integer(1)
    for d in shape:
        p = p * d
    return p


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def promote(*dtypes: str) -> str:
    floats = [d for d in dtypes if d.startswith("float") or d == "bfloat16"]
    if floats:
        return "float32" if "float32" in floats else floats[0]
    ints = [d for d in dtypes if d.startswith("int") or d == "uint8"]
    if ints:
        return "int64" if "int64" in ints else ints[0]
    return dtypes[0]


def evaluate(expr: Any, env: dict) -> Any:
    """Evaluate a dim (or nested list of dims) under symbol bindings {Symbol: int}."""
    if isinstance(expr, (list, tuple)):
        return type(expr)(evaluate(e, env) for e in expr)
    if isinstance(expr, sympy.Expr):
        v = expr.subs(env)
        if not v.is_Integer:
            raise ShapeError(f"dimension {expr} is not bound by the inputs (bindings {env})")
        return int(v)
    return expr


# -- elementwise -------------------------------------------------------------------------------

def _ew_infer(inputs, attrs):
    t = broadcast_shapes(*[i.type.shape for i in inputs])
    return TensorType(t, promote(*[i.type.dtype for i in inputs]))


def _cmp_infer(inputs, attrs):
    return TensorType(broadcast_shapes(*[i.type.shape for i in inputs]), "bool")


_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
           "maximum": torch.maximum, "minimum": torch.minimum}
_CMP = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
        "and": torch.logical_and, "or": torch.logical_or}
_UNARY = {"neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
          "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "relu": F.relu, "cos": torch.cos,
          "sin": torch.sin, "abs": torch.abs, "not": torch.logical_not, "erf": torch.erf}

for _n, _f in _BINARY.items():
    _op(_n, _ew_infer, "elementwise, broadcasting")(lambda ctx, x, a, f=_f: f(x[0], x[1]))
for _n, _f in _CMP.items():
    _op(_n, _cmp_infer, "comparison/logic, broadcasting")(lambda ctx, x, a, f=_f: f(x[0], x[1]))
for _n, _f in _UNARY.items():
    _op(_n, lambda i, a: i[0].type if a.get("dtype") is None else TensorType(i[0].type.shape, a["dtype"]),
        "elementwise unary")(lambda ctx, x, a, f=_f: f(x[0]))

_op("gelu", lambda i, a: i[0].type)(lambda ctx, x, a: F.gelu(x[0], approximate=a.get("approximate", "none")))
_op("cast", lambda i, a: TensorType(i[0].type.shape, a["dtype"]))(lambda ctx, x, a: x[0].to(torch_dtype(a["dtype"])))
_op("where", lambda i, a: TensorType(broadcast_shapes(*[n.type.shape for n in i]), promote(i[1].type.dtype, i[2].type.dtype)))(
    lambda ctx, x, a: torch.where(x[0], x[1], x[2]))
_op("const", lambda i, a: TensorType((), a.get("dtype", "float32")))(
    lambda ctx, x, a: torch.tensor(a["value"], dtype=torch_dtype(ctx.node.type.dtype)))


# -- reductions --------------------------------------------------------------------------------

def _reduce_infer(inputs, attrs):
    shape = inputs[0].type.shape
    dims = {norm_dim(d, len(shape)) for d in attrs["dims"]}
    out = tuple((sympy.Integer(1) if i in dims else d) for i, d in enumerate(shape)
                if attrs.get("keepdim") or i not in dims)
    return TensorType(out, inputs[0].type.dtype)


_REDUCE = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax, "amin": torch.amin}
for _n, _f in _REDUCE.items():
    _op(_n, _reduce_infer, "reduction over attrs['dims']")(
        lambda ctx, x, a, f=_f: f(x[0], dim=list(a["dims"]), keepdim=bool(a.get("keepdim"))))

_op("softmax", lambda i, a: i[0].type)(lambda ctx, x, a: torch.softmax(x[0], dim=a["dim"]))
_op("cumsum", lambda i, a: TensorType(i[0].type.shape, "int64" if i[0].type.dtype == "bool" else i[0].type.dtype))(
    lambda ctx, x, a: torch.cumsum(x[0], dim=a["dim"]))


# -- linear algebra ----------------------------------------------------------------------------

def _matmul_infer(inputs, attrs):
    a, b = inputs[0].type.shape, inputs[1].type.shape
    if len(a) < 2 or len(b) < 2:
        raise ShapeError("matmul needs rank >= 2 operands")
    if not same(a[-1], b[-2]):
        raise ShapeError(f"matmul inner dims differ: {a} @ {b}")
    batch = broadcast_shapes(a[:-2], b[:-2])
    return TensorType(batch + (a[-2], b[-1]), promote(inputs[0].type.dtype, inputs[1].type.dtype))


_op("matmul", _matmul_infer)(lambda ctx, x, a: torch.matmul(x[0], x[1]))


def _linear_infer(inputs, attrs):
    x, w = inputs[0].type, inputs[1].type
    if not same(x.shape[-1], w.shape[1]):
        raise ShapeError(f"linear: input features {x.shape[-1]} != weight in-features {w.shape[1]}")
    if len(inputs) > 2 and not same(inputs[2].type.shape[0], w.shape[0]):
        raise ShapeError("linear: bias length differs from out-features")
    return TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)


_op("linear", _linear_infer, "y = x @ w.T (+ b); w: [out, in]")(
    lambda ctx, x, a: F.linear(x[0], x[1], x[2] if len(x) > 2 else None))


def _embedding_infer(inputs, attrs):
    w, ids = inputs[0].type, inputs[1].type
    return TensorType(ids.shape + (w.shape[1],), w.dtype)


_op("embedding", _embedding_infer, "rows of w [vocab, dim] gathered by integer ids")(
    lambda ctx, x, a: F.embedding(x[1].long(), x[0]))


# -- shape ops ---------------------------------------------------------------------------------

def _reshape_infer(inputs, attrs):
    src = inputs[0].type.shape
    tgt = [dim(d) for d in attrs["shape"]]
    if any(d == -1 for d in tgt):
        known = numel([d for d in tgt if d != -1])
        tgt = [sympy.simplify(numel(src) / known) if d == -1 else d for d in tgt]
    if not same(numel(src), numel(tgt)):
        raise ShapeError(f"reshape {src} -> {tuple(tgt)} changes the element count")
    return TensorType(tuple(tgt), inputs[0].type.dtype)


_op("reshape", _reshape_infer)(lambda ctx, x, a: x[0].reshape(ctx.eval(a["shape"])))


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


_op("unsqueeze", _unsqueeze_infer)(lambda ctx, x, a: x[0].unsqueeze(a["dim"]))
_op("squeeze", _squeeze_infer)(lambda ctx, x, a: x[0].squeeze(a["dim"]))
_op("permute", _permute_infer)(lambda ctx, x, a: x[0].permute(*a["perm"]))


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


_op("expand", _expand_infer)(lambda ctx, x, a: x[0].expand(*ctx.eval(a["shape"])))


def _slice_bounds(size, start, end, step):
    start, end = dim(start), dim(end)
    if start.is_Integer and start < 0:
        start = size + start
    if end.is_Integer and end < 0:
        end = size + end
    if end.is_Integer and int(end) >= 2 ** 62:
        end = size
    elif end.is_Integer and size.is_Integer and end > size:
        end = size
    return start, end, sympy.floor((end - start + step - 1) / step) if step != 1 else end - start


def _slice_infer(inputs, attrs):
    s = list(inputs[0].type.shape)
    d = norm_dim(attrs["dim"], len(s))
    s[d] = sympy.simplify(_slice_bounds(s[d], attrs["start"], attrs["end"], attrs.get("step", 1))[2])
    return TensorType(tuple(s), inputs[0].type.dtype)


def _slice_ref(ctx, x, a):
    t = x[0]
    d = norm_dim(a["dim"], t.dim())
    start, end, _ = _slice_bounds(dim(t.shape[d]), ctx.eval(dim(a["start"])), ctx.eval(dim(a["end"])), a.get("step", 1))
    return t.narrow(d, int(start), int(end) - int(start))[(slice(None),) * d + (slice(None, None, a.get("step", 1)),)]


_op("slice", _slice_infer)(_slice_ref)


def _cat_infer(inputs, attrs):
    d = norm_dim(attrs["dim"], inputs[0].type.rank)
    s = list(inputs[0].type.shape)
    s[d] = sympy.simplify(sum((i.type.shape[d] for i in inputs), sympy.Integer(0)))
    return TensorType(tuple(s), promote(*[i.type.dtype for i in inputs]))


_op("cat", _cat_infer)(lambda ctx, x, a: torch.cat(list(x), dim=a["dim"]))


def _arange_infer(inputs, attrs):
    start, end, step = dim(attrs["start"]), dim(attrs["end"]), attrs.get("step", 1)
    return TensorType((sympy.simplify(sympy.ceiling((end - start) / step)),), attrs.get("dtype", "int64"))


_op("arange", _arange_infer)(lambda ctx, x, a: torch.arange(
    ctx.eval(dim(a["start"])), ctx.eval(dim(a["end"])), a.get("step", 1), dtype=torch_dtype(a.get("dtype", "int64"))))
_op("full", lambda i, a: TensorType(tuple(dim(d) for d in a["shape"]), a.get("dtype", "float32")))(
    lambda ctx, x, a: torch.full(ctx.eval(a["shape"]), a["value"], dtype=torch_dtype(a.get("dtype", "float32"))))


# Ops the tracer passes through from aten unchanged: they run in the interpreter (for shape-only
# subgraphs such as mask construction, which passes then remove) but have no lowering.
def _aten_ref(ctx, x, a):
    args = _rebuild(a["args"], list(x), ctx)
    kwargs = _rebuild(a.get("kwargs", {}), list(x), ctx)
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


_op("aten", lambda i, a: a["out_type"], "an aten op passed through unchanged (no lowering)")(_aten_ref)


# -- normalization and LLM-level ops -----------------------------------------------------------

def _rms_norm_ref(ctx, x, a):
    v = x[0]
    h = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + a["eps"])
    return x[1] * h if a.get("weight_first", True) else h * x[1]


_op("rms_norm", lambda i, a: i[0].type, "x * rsqrt(mean(x^2) + eps) * w over the last dim")(_rms_norm_ref)


def _layer_norm_ref(ctx, x, a):
    n = a.get("ndim", 1)
    return F.layer_norm(x[0], x[0].shape[-n:], x[1] if len(x) > 1 else None, x[2] if len(x) > 2 else None, a["eps"])


_op("layer_norm", lambda i, a: i[0].type)(_layer_norm_ref)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


_op("rope", lambda i, a: TensorType(broadcast_shapes(*[n.type.shape for n in i]), i[0].type.dtype),
    "x * cos + rotate_half(x) * sin (cos/sin broadcast against x)")(
    lambda ctx, x, a: x[0] * x[1] + rotate_half(x[0]) * x[2])


def _attention_infer(inputs, attrs):
    q, v = inputs[0].type, inputs[2].type
    return TensorType(q.shape[:-1] + (v.shape[-1],), q.dtype)


def kv_fake_quant(x: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """The value K/V take after a round trip through an 8-bit cache: one scale per token and head
    (absmax over head_dim). x: [..., head_dim]."""
    if not dtype or dtype == "float32":
        return x
    amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-8)
    if dtype == "int8":
        s = amax / 127.0
        return torch.round(x / s).clamp(-127, 127) * s
    if dtype == "fp8_e4m3":
        s = amax / 448.0
        return (x / s).to(torch.float8_e4m3fn).float() * s
    raise ValueError(f"unknown KV cache dtype {dtype}")


def alibi_bias(slopes, i: torch.Tensor, j: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ALiBi (Press et al., 2022): score bias slope[h] * (j - i) for query position i and key position j.
    Bloom adds slope * j; the two differ by a constant per query row, which softmax ignores.
    Returns [H, len(i), len(j)]."""
    s = torch.as_tensor(slopes, dtype=dtype)
    return s[:, None, None] * (j[None, None, :] - i[None, :, None]).to(dtype)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        causal: bool = True, window: int = 0, mask: torch.Tensor | None = None,
                        kv_dtype: str | None = None, alibi=None) -> torch.Tensor:
    """q: [B, H, T, D], k/v: [B, Hkv, S, D] with H a multiple of Hkv (GQA); `alibi`: per-head slopes [H]."""
    k, v = kv_fake_quant(k, kv_dtype), kv_fake_quant(v, kv_dtype)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    t, s = q.shape[-2], k.shape[-2]
    i = torch.arange(t) + (s - t)
    j = torch.arange(s)
    if mask is None and (causal or window):
        mask = j[None, :] <= i[:, None]
        if window:
            mask = mask & (j[None, :] > i[:, None] - window)
    if alibi is not None:
        bias = alibi_bias(alibi, i, j, q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


_op("attention", _attention_infer, "softmax(q k^T * scale + causal/window mask [+ ALiBi bias]) v; GQA by head groups")(
    lambda ctx, x, a: attention_reference(x[0], x[1], x[2], a["scale"], a.get("causal", True), a.get("window", 0),
                                          kv_dtype=a.get("kv_dtype"), alibi=a.get("alibi")))


def _sdpa_ref(ctx, x, a):
    mask = x[3] if len(x) > 3 else None
    q, k, v = x[0], x[1], x[2]
    if a.get("gqa") and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a.get("causal", False),
                                          scale=a.get("scale"))


_op("sdpa", _attention_infer, "torch's scaled_dot_product_attention with an explicit mask")(_sdpa_ref)


def _gated_mlp_ref(ctx, x, a):
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[a["act"]]
    return F.linear(act(F.linear(x[0], x[1])) * F.linear(x[0], x[2]), x[3])


_op("gated_mlp", lambda i, a: TensorType(i[0].type.shape[:-1] + (i[3].type.shape[0],), i[0].type.dtype),
    "down(act(gate(x)) * up(x)); weights [ffn, d], [ffn, d], [d, ffn]")(_gated_mlp_ref)


def cached_attention_reference(q, k, v, cache, page_table, positions, scales=None, scale: float = 1.0,
                               window: int = 0, kv_dtype: str | None = None, alibi=None):
    """Write k/v into the paged cache at `positions`, then attend each query over its cached prefix.

    q: [B, H, T, D]; k, v: [B, Hkv, T, D]; cache: [pages, 2, Hkv, page, D] (mutated in place);
    page_table: [B, max_pages]; positions: [B, T] (absolute; < 0 marks padding). An int8 cache comes
    with `scales [pages, 2, Hkv, page]` (one per token and head).
    """
    page = cache.shape[3]
    B, H, T, D = q.shape
    if scales is not None:  # int8 codes + scales: store quantized, read back dequantized
        amax = lambda x: x.abs().amax(-1).clamp_min(1e-8) / 127.0  # noqa: E731
        sk, sv = amax(k), amax(v)
        kq = torch.round(k / sk[..., None]).clamp(-127, 127)
        vq = torch.round(v / sv[..., None]).clamp(-127, 127)
        for b in range(B):
            for t in range(T):
                p = int(positions[b, t])
                if p >= 0:
                    pg = int(page_table[b, p // page])
                    cache[pg, 0, :, p % page] = kq[b, :, t].to(cache.dtype)
                    cache[pg, 1, :, p % page] = vq[b, :, t].to(cache.dtype)
                    scales[pg, 0, :, p % page] = sk[b, :, t]
                    scales[pg, 1, :, p % page] = sv[b, :, t]
        deq = cache.float() * scales[..., None]
        return cached_attention_reference(q, kq * sk[..., None], vq * sv[..., None], deq, page_table, positions,
                                          None, scale, window, alibi=alibi)
    k, v = kv_fake_quant(k, kv_dtype), kv_fake_quant(v, kv_dtype)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    pos = positions.long()
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            if p < 0:
                continue
            pg = int(page_table[b, p // page])
            cache[pg, 0, :, p % page] = k[b, :, t]
            cache[pg, 1, :, p % page] = v[b, :, t]
    rep = H // k.shape[1]
    for b in range(B):
        valid = pos[b][pos[b] >= 0]
        if valid.numel() == 0:
            continue
        n = int(valid.max()) + 1
        idx = torch.arange(n)
        pages = page_table[b, idx // page].long()
        keys = cache[pages, 0, :, idx % page].permute(1, 0, 2)  # [Hkv, n, D]
        vals = cache[pages, 1, :, idx % page].permute(1, 0, 2)
        keys, vals = keys.repeat_interleave(rep, 0), vals.repeat_interleave(rep, 0)
        s = torch.einsum("htd,hnd->htn", q[b], keys) * scale
        j = idx[None, :]
        i = pos[b][:, None]
        m = j <= i
        if window:
            m = m & (j > i - window)
        if alibi is not None:
            s = s + alibi_bias(alibi, pos[b], idx, s.dtype)
        s = s.masked_fill(~m[None], float("-inf"))
        o = torch.einsum("htn,hnd->htd", torch.softmax(s, -1), vals)
        out[b] = torch.where((pos[b] >= 0)[None, :, None], o, torch.zeros_like(o))
    return out


_op("cached_attention", lambda i, a: TensorType(i[0].type.shape, i[0].type.dtype),
    "attention over a paged KV cache: inputs q, k, v, cache, page_table, positions")(
    lambda ctx, x, a: cached_attention_reference(*x[:6], x[6] if len(x) > 6 else None, a["scale"],
                                                 a.get("window", 0), a.get("kv_dtype"), a.get("alibi")))


def _mla_keys_values(c, k_rope, w_uk, w_uv):
    """Keys and values from a latent: c [B, S, r], k_rope [B, Hkv, S, R], w_uk [Hkv, Dn, r],
    w_uv [Hkv, Dv, r] -> k [B, Hkv, S, Dn + R] (latent part first), v [B, Hkv, S, Dv]."""
    k_nope = torch.einsum("bsr,gdr->bgsd", c, w_uk.to(c.dtype))
    v = torch.einsum("bsr,gdr->bgsd", c, w_uv.to(c.dtype))
    return torch.cat([k_nope, k_rope.to(c.dtype)], -1), v


def mla_attention_reference(q_nope, q_rope, c, k_rope, w_uk, w_uv, scale: float, window: int = 0,
                            alibi=None) -> torch.Tensor:
    """Multi-head latent attention (DeepSeek-AI, 2024) over a shared latent with a decoupled rotary key:
    q_nope [B, H, T, Dn], q_rope [B, H, T, R], c [B, T, r], k_rope [B, Hkv, T, R]. Causal."""
    k, v = _mla_keys_values(c, k_rope, w_uk, w_uv)
    return attention_reference(torch.cat([q_nope, q_rope], -1), k, v, scale, True, window, alibi=alibi)


def _mla_infer(inputs, attrs):
    q = inputs[0].type
    return TensorType(q.shape[:-1] + (inputs[5].type.shape[1],), q.dtype)


_op("mla_attention", _mla_infer, "attention with keys/values expanded from a latent c by w_uk/w_uv; inputs q_nope, "
    "q_rope, c, k_rope, w_uk, w_uv")(
    lambda ctx, x, a: mla_attention_reference(*x[:6], a["scale"], a.get("window", 0), a.get("alibi")))


def cached_mla_attention_reference(q_nope, q_rope, c, k_rope, w_uk, w_uv, cache, page_table, positions,
                                   scale: float = 1.0, window: int = 0, alibi=None):
    """Append each token's latent row [c | k_rope of every KV head] to the paged cache at `positions`
    (cache: [pages, page, r + Hkv * R], mutated in place), then attend each query over its cached
    prefix with keys/values expanded from the cached latents. Positions < 0 are padding (zeros)."""
    page = cache.shape[1]
    B, H, T, _ = q_nope.shape
    r = c.shape[-1]
    G, R = k_rope.shape[1], k_rope.shape[-1]
    rows = torch.cat([c, k_rope.permute(0, 2, 1, 3).reshape(B, T, G * R)], -1)  # [B, T, r + Hkv*R]
    pos = positions.long()
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            if p >= 0:
                cache[int(page_table[b, p // page]), p % page] = rows[b, t].to(cache.dtype)
    out = torch.zeros(B, H, T, w_uv.shape[1], dtype=q_nope.dtype)
    for b in range(B):
        valid = pos[b][pos[b] >= 0]
        if valid.numel() == 0:
            continue
        n = int(valid.max()) + 1
        idx = torch.arange(n)
        lat = cache[page_table[b, idx // page].long(), idx % page].to(q_nope.dtype)  # [n, r + Hkv*R]
        kr = lat[:, r:].reshape(n, G, R).permute(1, 0, 2)[None]
        k, v = _mla_keys_values(lat[None, :, :r], kr, w_uk, w_uv)
        k, v = k[0].repeat_interleave(H // G, 0), v[0].repeat_interleave(H // G, 0)
        q = torch.cat([q_nope[b], q_rope[b]], -1)
        s = torch.einsum("htd,hnd->htn", q, k) * scale
        i, j = pos[b][:, None], idx[None, :]
        m = j <= i
        if window:
            m = m & (j > i - window)
        if alibi is not None:
            s = s + alibi_bias(alibi, pos[b], idx, s.dtype)
        s = s.masked_fill(~m[None], float("-inf"))
        o = torch.einsum("htn,hnd->htd", torch.softmax(s, -1), v)
        out[b] = torch.where((pos[b] >= 0)[None, :, None], o, torch.zeros_like(o))
    return out


_op("cached_mla_attention", _mla_infer, "mla_attention over a paged latent cache [pages, page, r + Hkv*R]: "
    "inputs q_nope, q_rope, c, k_rope, w_uk, w_uv, cache, page_table, positions")(
    lambda ctx, x, a: cached_mla_attention_reference(*x[:9], a["scale"], a.get("window", 0), a.get("alibi")))


def _qweight_ref(ctx, x, a):
    from .quant import dequantize
    return dequantize(x[0], x[1], x[2], a["group"])


_op("qweight", lambda i, a: TensorType(i[0].type.shape, "float32"),
    "a quantized weight: codes [N, K], scales and zero points [N, K/group]; value (q - z) * s. "
    "Targets fuse it into its consumer (no fp32 copy of the weight is materialized)")(_qweight_ref)


def _fake_quant_act_ref(ctx, x, a):
    # dynamic per-token symmetric int8: the value an int8 activation kernel would see
    t = x[0]
    s = t.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(t / s).clamp(-127, 127) * s


_op("quant_act", lambda i, a: i[0].type, "dynamic per-token int8 quantization of activations (value "
    "after dequantization)")(_fake_quant_act_ref)


def flops_of(node: Node) -> sympy.Expr:
    """Multiply-add count x2 for the ops that dominate (matmuls, attention); 0 for the rest."""
    if node.op == "linear":
        return 2 * numel(node.type.shape) * node.inputs[1].type.shape[1]
    if node.op == "matmul":
        return 2 * numel(node.type.shape) * node.inputs[0].type.shape[-1]
    if node.op == "gated_mlp":
        w = node.inputs[1].type.shape
        return 6 * numel(node.inputs[0].type.shape[:-1]) * w[0] * w[1]
    return sympy.Integer(0)

