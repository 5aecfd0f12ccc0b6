"""quantize-kv: store the paged KV cache in 8 bits (int8 or fp8 e4m3), one scale per token and head."""

from __future__ import annotations

from kiln.errors import PassError
from kiln.ir import Graph

from .registry import count, register


@register("quantize-kv", exact=False, phase="quantize", requires=("fuse-attention",))
def quantize_kv(graph: Graph, dtype: str = "int8") -> Graph:
    """Matches: every `attention` (run before kv-cache, which then lays out the 8-bit cache).
    Guarantees: the op carries kv_dtype, so keys and values are used as they come back from an 8-bit
    cache: per (token, head) absmax scale over head_dim; int8 symmetric (127 levels) or fp8 e4m3
    (scale to 448). kv-cache records the dtype in the cache layout. Lossy."""
    if dtype not in ("int8", "fp8_e4m3"):
        raise PassError(f"quantize-kv: dtype must be int8 or fp8_e4m3, got '{dtype}'")
    if graph.find("cached_attention"):
        raise PassError("quantize-kv changes the cache layout that kv-cache creates: place it before kv-cache")
    g = graph.copy()
    for n in g.nodes:
        if n.op == "attention":
            n.attrs["kv_dtype"] = dtype
            count(f"kv-{dtype}")
    return g
