"""kiln passes: one pass per file, each a function `Graph -> Graph` registered by name.

A pass's docstring says what it matches, what holds afterwards, and whether it is exact or lossy.
Passes count their rewrites with `count(rule)`; the pass manager collects the counters.

Each pass also declares, where it is registered, how it fits into a pipeline: its phase (where a
pass added to a pipeline goes, see PHASES), the passes whose result it needs (`requires`), and the
passes whose result it replaces (`invalidates`: a pass that requires one of those must run before it).
The pass manager checks a pipeline against these declarations before running it.
"""
from __future__ import annotations

from .registry import PHASES, PassInfo, REGISTRY, count, register, run_counted  # noqa: F401  (the package's API)

# Import the pass modules so they register themselves.
from . import canonicalize, fuse_norms, fuse_rope, fuse_attention, fuse_mlp, kv_cache, quantize_weights, quantize_kv, quantize_activations  # noqa: E402,F401,E501
from . import prune_heads, prune_ffn, prune_layers, sparsify  # noqa: E402,F401
from . import convert_gqa, convert_mla  # noqa: E402,F401  (attention rewriting)
