"""kiln passes: one pass per file, each a function `Graph -> Graph` registered by name.

A pass's docstring says what it matches, what holds afterwards, and whether it is exact or lossy.
Passes count their rewrites with `count(rule)`; the pass manager collects the counters.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable

from kiln.ir import Graph


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[..., Graph]
    exact: bool
    doc: str


REGISTRY: dict[str, PassInfo] = {}
_counter: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("kiln_rewrites", default=None)


def register(name: str, exact: bool = True):
    """Register `fn(graph, **params) -> graph` as pass `name`."""
    def deco(fn):
        REGISTRY[name] = PassInfo(name, fn, exact, (fn.__doc__ or "").strip())
        return fn
    return deco


def count(rule: str, n: int = 1) -> None:
    """Record that `rule` rewrote `n` places (read by the pass manager)."""
    c = _counter.get()
    if c is not None:
        c[rule] = c.get(rule, 0) + n


def run_counted(info: PassInfo, graph: Graph, params: dict[str, Any]) -> tuple[Graph, dict[str, int]]:
    counts: dict[str, int] = {}
    token = _counter.set(counts)
    try:
        out = info.fn(graph, **params)
    finally:
        _counter.reset(token)
    return out, counts


# Import the pass modules so they register themselves.
from . import canonicalize, fuse_norms, fuse_rope, fuse_attention, fuse_mlp, kv_cache, quantize_weights, quantize_kv, quantize_activations  # noqa: E402,F401,E501
from . import prune_heads, prune_ffn, prune_layers, sparsify  # noqa: E402,F401
from . import convert_gqa, convert_mla  # noqa: E402,F401  (attention rewriting)
