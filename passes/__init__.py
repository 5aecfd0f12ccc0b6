"""kiln passes: one pass per file, each a function `Graph -> Graph` registered by name.

A pass's docstring says what it matches, what holds afterwards, and whether it is exact or lossy.
Passes count their rewrites with `count(rule)`; the pass manager collects the counters.

Each pass also declares, where it is registered, how it fits into a pipeline: its phase (where a
pass added to a pipeline goes, see PHASES), the passes whose result it needs (`requires`), and the
passes whose result it replaces (`invalidates`: a pass that requires one of those must run before it).
The pass manager checks a pipeline against these declarations before running it.
"""

from __future__ import annotations

# The pass modules register themselves when imported.
from . import (  # noqa: F401
    canonicalize,
    convert_gqa,
    convert_mla,
    fuse_attention,
    fuse_mlp,
    fuse_moe,
    fuse_norms,
    fuse_rope,
    kv_cache,
    prune_ffn,
    prune_heads,
    prune_layers,
    quantize_activations,
    quantize_kv,
    quantize_weights,
    shard_tensor_parallel,
    sparsify,
)
from .registry import PHASES, REGISTRY, PassInfo, count, register, run_counted  # noqa: F401  (the package's API)
