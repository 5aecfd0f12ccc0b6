"""The pass registry: `register` (with each pass's pipeline declaration), `count` (rewrite counters) and
`run_counted`. Passes import it from here, not from the package, so that no pass module depends on
another through the package's imports."""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kiln.ir import Graph

# The phases of a pipeline, in order. A pass added to a pipeline (kiln.pipeline.insert_passes) goes
# before the first pass of a later phase; passes without a phase (canonicalize) may run anywhere and
# are written into a pipeline by hand.
PHASES: tuple[str, ...] = (
    "recognize",  # traced subgraphs become the LLM ops later passes look for (norms, rope, attention)
    "convert",  # the attention's form changes (GQA, MLA): later passes see the converted heads
    "prune",  # layers, heads, FFN channels and weights go, in the order written
    "quantize",  # precision drops (weights or activations, then the KV cache) on the pruned model
    "fuse",  # linears merge (gated MLP): earlier phases observe each linear's input, so this waits
    "cache",  # the incremental program with its paged KV cache is derived
    "shard",  # the program is split over a tensor-parallel group (after the cache: a rank holds its heads' pages)
    "place",  # target annotations on the incremental program
)


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[..., Graph]
    exact: bool
    doc: str
    phase: str | None = None
    requires: tuple[str, ...] = ()
    invalidates: tuple[str, ...] = ()

    def parameters(self) -> tuple[dict[str, bool], bool]:
        """({parameter: required}, accepts any keyword): what a pipeline may pass, from the signature."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]  # the first is the graph
        named = {
            p.name: p.default is inspect.Parameter.empty
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        return named, any(p.kind is p.VAR_KEYWORD for p in params)


REGISTRY: dict[str, PassInfo] = {}
_counter: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("kiln_rewrites", default=None)


def register(
    name: str,
    exact: bool = True,
    phase: str | None = None,
    requires: tuple[str, ...] = (),
    invalidates: tuple[str, ...] = (),
) -> Callable[[Callable[..., Graph]], Callable[..., Graph]]:
    """Register `fn(graph, **params) -> graph` as pass `name`, with its place in a pipeline (see PHASES)."""
    if phase is not None and phase not in PHASES:
        raise ValueError(f"pass '{name}': phase {phase!r} is not one of {', '.join(PHASES)}")

    def deco(fn: Callable[..., Graph]) -> Callable[..., Graph]:
        REGISTRY[name] = PassInfo(
            name, fn, exact, (fn.__doc__ or "").strip(), phase, tuple(requires), tuple(invalidates)
        )
        return fn

    return deco


def count(rule: str, n: int = 1) -> None:
    """Record that `rule` rewrote `n` places (read by the pass manager)."""
    c = _counter.get()
    if c is not None:
        c[rule] = c.get(rule, 0) + n


def run_counted(info: PassInfo, graph: Graph, params: dict[str, Any]) -> tuple[Graph, dict[str, int]]:
    """Run one pass and return its result with the rewrites it counted (no checks, no records)."""
    counts: dict[str, int] = {}
    token = _counter.set(counts)
    try:
        out = info.fn(graph, **params)
    finally:
        _counter.reset(token)
    return out, counts
