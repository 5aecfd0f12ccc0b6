"""Tracing: `torch.export` of a causal LM's full-sequence forward, converted into kiln IR.

The model is exported once with symbolic `batch` and `tokens` dimensions; each aten op becomes a
kiln op through one table (`_CONVERT`). Nothing here knows about any architecture: recognizer passes
find norms, rotary embeddings, attention and MLPs afterwards. The one exception is what cannot be exported
at all: a state-space mixer's scan loops over the sequence in Python, so its functions are captured whole
as one op each while tracing (capture.py says why and how).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import sympy
import torch

from .aten_convert import _CONVERT, _PASSTHROUGH, source_line
from .capture import substitute_mixers
from .decompose import decompose_unconverted
from .errors import UnsupportedOpError
from .ir import Graph, Node, TensorType, sym
from .ops import torch_dtype_name

BATCH, TOKENS = sym("batch"), sym("tokens")


class _LogitsOnly(torch.nn.Module):
    """Full-sequence forward `input_ids -> logits`, with no KV cache: the program kiln derives from."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.m(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]


def export(model: torch.nn.Module, max_tokens: int = 4096) -> tuple[Any, list[str]]:
    """torch.export with symbolic batch and tokens; returns the ExportedProgram in the inference IR,
    with the ops kiln cannot convert decomposed by torch's tables where torch knows how (decompose.py),
    and the names of the ops so decomposed."""
    from torch.export import Dim

    model = model.eval()
    ids = torch.randint(0, 8, (2, 8))
    shapes = ({0: Dim("batch", min=1, max=1024), 1: Dim("tokens", min=1, max=max_tokens)},)
    import warnings

    with torch.no_grad(), warnings.catch_warnings(), _static_experts(model), substitute_mixers(model):
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations, not the user's
        ep = torch.export.export(_LogitsOnly(model), (ids,), dynamic_shapes=shapes, strict=False)
    return decompose_unconverted(ep, set(_CONVERT) | _PASSTHROUGH, first=True)


@contextlib.contextmanager
def _static_experts(model: torch.nn.Module) -> Iterator[None]:
    """Export mixture-of-experts layers in transformers' `batched_mm` form while tracing.

    Its default `grouped_mm` form sorts tokens by expert (sort, histc, index_put: shapes that depend on
    the routing), which no static program can hold; `batched_mm` gathers each token's chosen experts'
    weights and computes the same sum with static shapes. The model's own setting is restored after."""
    cfgs: list[Any] = [getattr(m, "config", None) for m in model.modules()]
    cfgs = [c for c in cfgs if getattr(c, "_experts_implementation", None)]
    saved = [c._experts_implementation for c in cfgs]
    for c in cfgs:
        c._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        for c, v in zip(cfgs, saved):
            c._experts_implementation = v


class _Converter:
    def __init__(self, ep, graph: Graph) -> None:
        self.ep = ep
        self.g = graph
        self.values: dict[Any, Any] = {}
        self.symbols: dict[sympy.Symbol, sympy.Expr] = {}
        self.node: torch.fx.Node | None = None  # fx node being converted (set by run)

    # -- argument conversion ---------------------------------------------------------------------
    def expr(self, e) -> sympy.Expr:
        return sympy.sympify(e).subs(self.symbols)

    def dimval(self, v) -> Any:
        """An fx argument that is a size: a python int, a SymInt, or an fx node holding one."""
        if isinstance(v, torch.fx.Node):
            return self.values[v]
        if isinstance(v, torch.SymInt):
            return self.expr(v.node.expr)
        return v

    def tensor(self, v, like: Node | None = None) -> Node:
        if isinstance(v, torch.fx.Node):
            out = self.values[v]
            if isinstance(out, Node):
                return out
            v = out
        if isinstance(v, bool):
            return self.g.const(v, "bool")
        if isinstance(v, int) or (isinstance(v, sympy.Expr) and v.is_Integer):
            dt = like.type.dtype if like is not None and not like.type.dtype.startswith("float") else None
            if like is not None and like.type.dtype.startswith("float"):
                return self.g.const(float(v), like.type.dtype)
            return self.g.const(int(v), dt or "int64")
        if isinstance(v, float):
            dt = like.type.dtype if like is not None and like.type.dtype.startswith("float") else "float32"
            return self.g.const(v, dt)
        assert self.node is not None  # arguments are converted while run() walks a node
        raise UnsupportedOpError(str(self.node.target), source_line(self.node), f"argument {v!r} is not a tensor")

    def out_type(self) -> TensorType:
        assert self.node is not None  # called while run() walks a node
        val = self.node.meta["val"]
        return TensorType(
            tuple(self.expr(d) if isinstance(d, torch.SymInt) else sympy.Integer(d) for d in val.shape),
            torch_dtype_name(val.dtype),
        )

    def add(self, op: str, inputs: list[Node], attrs: dict | None = None, **kw) -> Node:
        assert self.node is not None  # called while run() walks a node
        return self.g.add(op, inputs, attrs, name=self.node.name, source=source_line(self.node), **kw)

    # -- the walk ---------------------------------------------------------------------------------
    def run(self) -> None:
        ep = self.ep
        sig = ep.graph_signature
        specs = {s.arg.name: s for s in sig.input_specs}
        consts = dict(ep.state_dict)
        consts.update(getattr(ep, "constants", {}) or {})
        for n in ep.graph.nodes:
            self.node = n
            if n.op == "placeholder":
                spec = specs[n.name]
                if spec.kind.name == "USER_INPUT":
                    val = n.meta["val"]
                    b, t = val.shape
                    self.symbols[sympy.sympify(b.node.expr)] = BATCH
                    self.symbols[sympy.sympify(t.node.expr)] = TOKENS
                    self.values[n] = self.g.add_input("input_ids", TensorType((BATCH, TOKENS), "int64"))
                else:
                    name = spec.target[2:] if spec.target.startswith("m.") else spec.target
                    t = consts[spec.target].detach()
                    self.values[n] = self.g.add_param(name, t.float() if t.is_floating_point() else t)
            elif n.op == "call_function":
                fn = _CONVERT.get(n.target)
                if fn is None:
                    if n.target in _PASSTHROUGH:
                        self.values[n] = self.passthrough(n)
                        continue
                    raise UnsupportedOpError(str(n.target), source_line(n))
                self.values[n] = fn(self, *n.args, **n.kwargs)
            elif n.op == "output":
                outs = n.args[0]
                self.g.outputs = [self.tensor(o) for o in (outs if isinstance(outs, (list, tuple)) else [outs])]

    def passthrough(self, n) -> Node:
        inputs: list[Node] = []

        def spec(a):
            if isinstance(a, torch.fx.Node):
                v = self.values[a]
                if isinstance(v, Node):
                    inputs.append(v)
                    return {"__input__": len(inputs) - 1}
                return v
            if isinstance(a, (list, tuple)):
                return type(a)(spec(x) for x in a)
            if isinstance(a, torch.device):
                return a
            return a

        args = spec(list(n.args))
        kwargs = {k: spec(v) for k, v in n.kwargs.items()}
        return self.add(
            "aten",
            inputs,
            {"fn": n.target, "args": args, "kwargs": kwargs, "out_type": self.out_type()},
            type=self.out_type(),
        )


def trace(model: torch.nn.Module, name: str = "main", max_tokens: int = 4096) -> Graph:
    """Trace a causal LM (`input_ids [batch, tokens] -> logits`) into a kiln Graph."""
    ep, decomposed = export(model, max_tokens)
    g = Graph(name)
    conv = _Converter(ep, g)
    conv.run()
    g.dce()
    cfg = getattr(model, "config", None)
    g.meta["model"] = _config_summary(cfg) if cfg is not None else {}
    g.meta["max_tokens"] = max_tokens
    g.meta["decomposed"] = decomposed
    return g


def _config_summary(cfg) -> dict:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    keep = {}
    for k, v in d.items():
        if isinstance(v, (int, float, str, bool)) or v is None or (isinstance(v, (list, dict)) and len(str(v)) < 2000):
            keep[k] = v
    keep.pop("quantization_config", None)
    return keep
