"""The op record: everything kiln knows about an op, declared once.

An `OpDef` holds an op's named inputs (optional ones marked), its attributes as a frozen dataclass
with their defaults, its `kind`, how its output type follows from its inputs (`infer`), what it
computes (`ref`, the reference interpreter's torch implementation), its cost (`flops`, `bytes`), and
the rules back ends register for it (`register_rule`). The topic files (core, shape, nn, attention,
quant) declare the ops with `define`; `Graph.add` checks a node's attributes against the record and
fills in the defaults, so every consumer reads `n.attrs["window"]` directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from ..errors import KilnError
from ..ir import Node, TensorType

# An op's kind says what sort of computation it is, so that passes, cost models and targets can ask
# for a group of ops ("every view op") instead of keeping their own list of names.
KINDS: dict[str, str] = {
    "elementwise": "binary arithmetic over broadcast operands (add, sub, mul, div, pow, maximum, minimum)",
    "comparison": "comparison or logic over broadcast operands, a bool result (eq, ne, lt, le, gt, ge, and, or)",
    "unary": "one operand, value by value, same shape (neg, exp, ..., silu, gelu, cast)",
    "reduction": "reads along dims: sum, mean, amax, amin reduce them; softmax and cumsum keep them",
    "view": "layout only, no arithmetic (reshape, permute, unsqueeze, squeeze, expand, slice)",
    "data": "makes, joins, selects or gathers values without arithmetic (const, arange, full, cat, where, embedding)",
    "matmul": "matrix products (matmul, linear, gated_mlp)",
    "norm": "normalization over the last dims (rms_norm, layer_norm)",
    "position": "position encodings (rope)",
    "attention": "attention over keys and values, fused or over a paged cache",
    "quant": "quantized values (qweight, quant_act)",
    "collective": "communication among the ranks of a tensor-parallel group (all_reduce, all_gather)",
    "recurrent": "a scan over tokens with a fixed-size state per sequence (selective_scan, causal_conv1d)",
    "opaque": "an aten op passed through from the trace (aten): interpreter only, no lowering",
}

# Keys a pass may attach to any node besides the op's own attributes. They carry no default: an
# absent annotation means "not annotated", so readers use `n.attrs.get(key)`.
ANNOTATIONS: dict[str, str] = {
    "placement": "gpu | pim: where the pim target runs the op (place-pim)",
    "placement_reason": "why place-pim chose that placement",
    "last_token": "on the slice kv-cache puts before the LM head: the verify entry point skips it "
    "to return every token's logits",
}


class ShapeError(ValueError):
    """A node's inputs do not fit together."""


class AttrError(KilnError, ValueError):
    """A node's attributes do not match its op's record (an unknown key, or a required one missing)."""


@dataclass(frozen=True)
class Input:
    """One named input of an op. Optional inputs come last; absent ones are simply not in `inputs`."""

    name: str
    optional: bool = False
    variadic: bool = False  # any number of inputs (cat, aten); only as the op's one input


@dataclass(frozen=True)
class NoAttrs:
    """The attributes of an op that has none."""


# -- dtypes ------------------------------------------------------------------------------------

_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_TORCH = {v: k for k, v in _DTYPES.items()}
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def torch_dtype_name(dt: torch.dtype) -> str:
    return _DTYPES[dt]


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH[name]


# -- dimension helpers -------------------------------------------------------------------------


def same(a: sympy.Expr, b: sympy.Expr) -> bool:
    """Two dims are equal (symbolically, when they are expressions)."""
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


# -- costs -------------------------------------------------------------------------------------


def tensor_bytes(t: TensorType) -> sympy.Expr:
    return numel(t.shape) * DTYPE_BYTES.get(t.dtype, 4)


def read_bytes(node: Node) -> sympy.Expr:
    """Bytes a consumer reads of `node`'s value: its tensor, or for a `qweight` (which targets fuse into
    its consumer) the codes at `bits` bits plus scales and zeros."""
    if node.op == "qweight":
        codes, scales, zeros = node.inputs
        return numel(codes.type.shape) * node.attrs["bits"] / 8 + tensor_bytes(scales.type) + tensor_bytes(zeros.type)
    return tensor_bytes(node.type)


def io_bytes(node: Node) -> sympy.Expr:
    """Bytes read and written when the op runs on its own: every input plus the output."""
    return tensor_bytes(node.type) + sum((read_bytes(i) for i in node.inputs), sympy.Integer(0))


def no_bytes(node: Node) -> sympy.Expr:
    return sympy.Integer(0)


def no_flops(node: Node) -> sympy.Expr:
    return sympy.Integer(0)


# -- the record --------------------------------------------------------------------------------


def _unset(ctx: Any, x: list, a: dict) -> torch.Tensor:
    raise NotImplementedError("this op has no reference implementation")


@dataclass(frozen=True)
class OpDef:
    """One op: named inputs, typed attributes, kind, type rule, reference, cost, back-end rules."""

    name: str
    kind: str
    inputs: tuple[Input, ...]
    attrs: type  # a frozen dataclass: its fields are the op's attributes, with their defaults
    infer: Callable[[list, dict], TensorType]  # infer(inputs: Nodes, None for absent optionals, attrs)
    ref: Callable[..., torch.Tensor] = _unset  # ref(ctx, inputs: Tensors, None for absent optionals, attrs)
    doc: str = ""
    flops: Callable[[Node], sympy.Expr] = no_flops  # multiply-adds x2 (0 where they do not dominate)
    bytes: Callable[[Node], sympy.Expr] = io_bytes  # memory traffic of the op on its own
    # What each back end does with the op, registered by the back end itself (see `register_rule`):
    # "relax" (generic TVM lowering), "cpu", "cuda" (target lowerings), "mlir", "pim" (cost model), ...
    rules: dict[str, Callable] = field(default_factory=dict, compare=False)

    # -- inputs ---------------------------------------------------------------------------------
    def input_index(self, name: str) -> int:
        for i, inp in enumerate(self.inputs):
            if inp.name == name and not inp.variadic:
                return i
        raise KeyError(
            f"op '{self.name}' has no input named '{name}' "
            f"(its inputs: {', '.join(i.name for i in self.inputs) or 'none'})"
        )

    def arity(self) -> tuple[int, int | None]:
        """(fewest, most) inputs a node of this op takes; most is None for a variadic op."""
        if any(i.variadic for i in self.inputs):
            return 0, None
        return sum(1 for i in self.inputs if not i.optional), len(self.inputs)

    def check_inputs(self, count: int, where: str = "") -> None:
        lo, hi = self.arity()
        if count < lo or (hi is not None and count > hi):
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise ShapeError(
                f"{where}{self.name} takes {want} inputs "
                f"({', '.join(i.name + ('?' if i.optional else '') for i in self.inputs)}), got {count}"
            )

    def padded(self, values: Sequence) -> list:
        """`values` (one per present input) with None for each absent optional input."""
        _, hi = self.arity()
        out = list(values)
        if hi is not None and len(out) < hi:
            out += [None] * (hi - len(out))
        return out

    # -- attributes -----------------------------------------------------------------------------
    def defaults(self) -> dict[str, Any]:
        """The attributes that have a default, with it."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self.attrs):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    def complete(self, attrs: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """`attrs` checked against the op's dataclass, with every default filled in. Raises AttrError
        for an unknown key (annotations excepted) or a missing required one."""
        names = [f.name for f in dataclasses.fields(self.attrs)]
        for k in attrs:
            if k not in names and k not in ANNOTATIONS:
                raise AttrError(
                    f"{where}op '{self.name}' has no attribute '{k}' (it takes "
                    f"{', '.join(names) or 'none'}; any op may carry {', '.join(ANNOTATIONS)})"
                )
        out = dict(attrs)
        defaults = self.defaults()
        for k in names:
            if k in out:
                continue
            if k not in defaults:
                raise AttrError(f"{where}op '{self.name}' needs attribute '{k}' ({self.attrs.__name__})")
            out[k] = defaults[k]
        return out

    def typed(self, attrs: Mapping[str, Any]) -> Any:
        """The attributes as the op's dataclass (annotations left out)."""
        names = {f.name for f in dataclasses.fields(self.attrs)}
        return self.attrs(**{k: v for k, v in attrs.items() if k in names})


OPS: dict[str, OpDef] = {}


def _parse_input(spec: str) -> Input:
    # "bias?" is optional, "*xs" takes any number of inputs
    if spec.startswith("*"):
        return Input(spec[1:], variadic=True)
    if spec.endswith("?"):
        return Input(spec[:-1], optional=True)
    return Input(spec)


def define(
    name: str,
    kind: str,
    inputs: Sequence[str],
    attrs: type,
    infer: Callable,
    ref: Callable = _unset,
    doc: str = "",
    flops: Callable[[Node], sympy.Expr] = no_flops,
    bytes: Callable[[Node], sympy.Expr] = io_bytes,
) -> OpDef:
    """Declare op `name`. `inputs` are names, "x?" optional (only after the required ones), "*xs" variadic."""
    if name in OPS:
        raise ValueError(f"op '{name}' is declared twice")
    if kind not in KINDS:
        raise ValueError(f"op '{name}': kind '{kind}' is not one of {', '.join(KINDS)}")
    if not (dataclasses.is_dataclass(attrs) and attrs.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"op '{name}': attrs must be a frozen dataclass")
    ins = tuple(_parse_input(s) for s in inputs)
    if any(a.optional and not b.optional for a, b in zip(ins, ins[1:])):
        raise ValueError(f"op '{name}': optional inputs must come last")
    rec = OpDef(name, kind, ins, attrs, infer, ref, doc, flops, bytes)
    if any(i.optional for i in ins):  # absent optional inputs reach infer and ref as None
        rec = dataclasses.replace(rec, infer=_padding(rec, infer), ref=_padding_ref(rec, ref))
    OPS[name] = rec
    return rec


def _padding(rec: OpDef, infer: Callable) -> Callable:
    def padded_infer(inputs: list, attrs: dict) -> TensorType:
        return infer(rec.padded(inputs), attrs)

    return padded_infer


def _padding_ref(rec: OpDef, ref: Callable) -> Callable:
    def padded_ref(ctx: Any, x: list, a: dict) -> torch.Tensor:
        return ref(ctx, rec.padded(x), a)

    return padded_ref


def ops_of_kind(*kinds: str) -> frozenset[str]:
    """Names of the ops of the given kinds (see KINDS)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise KeyError(f"no op kind '{bad[0]}' (kinds: {', '.join(KINDS)})")
    return frozenset(n for n, r in OPS.items() if r.kind in kinds)


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


def flops_of(node: Node) -> sympy.Expr:
    """Multiply-add count x2 for the ops that dominate (matmuls); 0 for the rest (see OpDef.flops)."""
    rec = OPS.get(node.op)
    return rec.flops(node) if rec is not None else sympy.Integer(0)


def bytes_of(node: Node) -> sympy.Expr:
    """Bytes the op reads and writes on its own (see OpDef.bytes); 0 for inputs and parameters."""
    rec = OPS.get(node.op)
    return rec.bytes(node) if rec is not None else sympy.Integer(0)
