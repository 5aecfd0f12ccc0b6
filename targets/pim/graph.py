"""The pim target's per-op cost rules, registered on the op records ("pim"), and the decode step of a
whole kiln graph built from them (`graph_works`, `simulate_graph`). The cost functions themselves (FC
layers, attention, elementwise ops on GPU and PIM) are in cost.py."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kiln.ops import find_rule, ops_of_kind, register_rule

from .cost import StepResult, Work, attention_work, ew_work, fc_work, simulate_step
from .hw import DEFAULT, PimHardware

_VIEWS = ops_of_kind("view")  # layout only: no work


_LAYER = re.compile(r"layers?[._](\d+)[._]")


def _param_names(node) -> list[str]:
    return [i.attrs["name"] for i in node.inputs if i.op == "param"]


@dataclass
class _Site:
    """What a cost rule knows about where an op runs: decode sizes, its layer and block, fp16 bytes."""

    batch: int
    tokens: int
    context: int
    dtype_bytes: int
    layer: int | None
    block: str
    n_el: Any  # TensorType -> elements at these sizes


@register_rule("pim", "linear")
def _linear_work(node, site: _Site) -> Work:
    if node.inputs[1].op not in ("param", "qweight"):  # activation x activation: no resident operand
        return _elementwise_work(node, site)
    n_out, k = (int(d) for d in node.inputs[1].type.shape)
    w = fc_work(node.name, site.layer, site.block, site.n_el(node.type) // n_out, n_out, k, site.dtype_bytes)
    w.op = "linear"
    return w


@register_rule("pim", "gated_mlp")
def _gated_mlp_work(node, site: _Site) -> Work:
    f, d = (int(x) for x in node.inputs[1].type.shape)
    mm, b = site.n_el(node.inputs[0].type) // d, site.dtype_bytes
    return Work(
        node.name,
        "gated_mlp",
        "fc",
        site.layer,
        "mlp",
        macs=3 * mm * f * d,
        resident_bytes=3 * f * d * b,
        act_bytes=(2 * mm * d + 3 * mm * f) * b,
        reuse=mm,
        groups=1,
        phases=[(2 * f * d * b, d * b, 2 * f * b), (f * d * b, f * b, d * b)],
        resident="weights",
    )


@register_rule("pim", "cached_attention")
def _attention_work(node, site: _Site) -> Work:
    q, cache = node.input("q").type, node.input("cache").type
    heads, hd, kvh = int(q.shape[1]), int(q.shape[3]), int(cache.shape[2])
    ctx = site.context if not node.attrs["window"] else min(site.context, int(node.attrs["window"]))
    return attention_work(node.name, site.layer, site.batch, site.tokens, ctx, heads, kvh, hd, site.dtype_bytes)


@register_rule("pim", "embedding")
def _embedding_work(node, site: _Site) -> Work:
    return ew_work(node.name, "embedding", None, 2 * site.n_el(node.type) * site.dtype_bytes, kind="embed")


@register_rule("pim", *_VIEWS)
def _view_work(node, site: _Site) -> Work:
    return Work(node.name, node.op, "view", site.layer)  # layout only: no work


def _elementwise_work(node, site: _Site) -> Work:
    """Any other op: streams its non-parameter inputs and its output once."""
    nbytes = sum(site.n_el(i.type) for i in node.inputs if i.op not in ("param", "const")) + site.n_el(node.type)
    return ew_work(node.name, node.op, site.layer, nbytes * site.dtype_bytes)


def graph_works(graph, batch: int, context: int, spec: int = 0, hw: PimHardware = DEFAULT) -> list[tuple[Any, Work]]:
    """Work items of every op of a kv-cached kiln graph at decode (batch, tokens = 1 + spec, `context` cached).

    Each op's work comes from its "pim" rule on the op record (above), or streams its operands once.
    Sizes come from the IR types with `batch`/`tokens` bound; the simulated hardware runs fp16
    (`hw.dtype_bytes`) whatever the IR's dtype. Layers come from parameter names (`...layers.N...`) or the
    `layer` attribute; ops without one inherit the last seen layer, ops reading non-layer parameters
    (final norm, LM head, embedding) are layer None."""
    import sympy

    from kiln.ir import sym
    from kiln.ops import numel

    T = 1 + spec
    env = {sym("batch"): batch, sym("tokens"): T, sym("pages"): 1, sym("max_pages"): 1}

    def n_el(t) -> int:
        v = numel(t.shape).subs(env)
        return int(v) if isinstance(v, sympy.Integer) or getattr(v, "is_Integer", False) else 0

    out: list[tuple[Any, Work]] = []
    layer = None
    for node in graph.nodes:
        if node.op in ("input", "param", "const"):
            continue
        names = _param_names(node)
        m = next((_LAYER.search(nm) for nm in names if _LAYER.search(nm)), None)
        if node.op == "cached_attention" and node.attrs["layer"] is not None:
            layer = int(node.attrs["layer"])
        elif m:
            layer = int(m.group(1))
        elif names and node.op != "embedding":
            layer = None
        block = (
            "attn"
            if any("attn" in nm or "attention" in nm for nm in names)
            else "mlp"
            if any("mlp" in nm or "ffn" in nm for nm in names)
            else ""
        )
        site = _Site(batch, T, context, hw.dtype_bytes, None if node.op == "embedding" else layer, block, n_el)
        rule = find_rule(node.op, ("pim",)) or _elementwise_work
        out.append((node, rule(node, site)))
    return out


def simulate_graph(
    graph,
    batch: int,
    context: int,
    spec: int = 0,
    hw: PimHardware = DEFAULT,
    policy: str = "auto",
    use_annotations: bool = True,
) -> StepResult:
    """One decode step of a kiln graph. With `use_annotations`, ops annotated by `place-pim` keep their placement."""
    pairs = graph_works(graph, batch, context, spec, hw)
    placements = None
    if use_annotations and policy == "auto":
        placements = {n.name: n.attrs["placement"] for n, _ in pairs if "placement" in n.attrs}
    return simulate_step([w for _, w in pairs], hw, policy, tokens=batch * (1 + spec), placements=placements)
