"""place-pim: decide, op by op, whether a decode step runs it on the GPU or in the PIM-enabled HBM.

Matches: every op of a kv-cached graph (run after kv-cache). For the decode entry point at `batch` sequences,
`context` cached tokens and `spec` speculative tokens per sequence (tokens = 1 + spec), each op gets
`attrs["placement"] = "gpu" | "pim"` and `attrs["placement_reason"]` from the offload rule of
`kiln.targets.pim.cost.decide`: PIM only when the op's operand lives in PIM memory (weights or KV cache,
never GPU-produced activations), its reuse (batch x tokens for FC layers, GQA group x tokens for attention)
is below the break-even reuse, and its simulated PIM time is lower than its GPU time.
`graph.meta["pim"]` records the parameters and the hardware config version.
Exact: placement is an annotation; no computation changes.
"""

from __future__ import annotations

from kiln.errors import PassError
from kiln.ir import Graph
from kiln.passes.registry import count, register


@register("place-pim", exact=True, phase="place", requires=("kv-cache",))
def place_pim(graph: Graph, batch: int = 1, context: int = 2048, spec: int = 0, policy: str = "auto", hw=None) -> Graph:
    """Matches: every op (after kv-cache). Guarantees: each op has attrs placement (gpu|pim) and
    placement_reason for decode at (batch, context, spec). Exact: annotations only."""
    from .cost import decide
    from .graph import graph_works
    from .hw import DEFAULT, PimHardware

    hw = hw or DEFAULT
    if not isinstance(hw, PimHardware):
        raise PassError(f"place-pim: hw must be a PimHardware, got {type(hw).__name__}")
    for k, v in (("batch", batch), ("context", context)):
        if int(v) < 1:
            raise PassError(f"place-pim: {k} must be >= 1, got {v}")
    if int(spec) < 0:
        raise PassError(f"place-pim: spec must be >= 0, got {spec}")
    if "kv_cache" not in graph.meta:
        raise PassError("place-pim: run kv-cache first (placement is decided for the decode entry point)")
    g = graph.copy()
    for node, w in graph_works(g, int(batch), int(context), int(spec), hw):
        where, why, gc, pc = decide(w, hw, policy)
        node.attrs["placement"] = where
        node.attrs["placement_reason"] = why
        if w.kind != "view":
            count(f"{where}-{w.kind}")
    g.meta["pim"] = {
        "batch": int(batch),
        "context": int(context),
        "spec": int(spec),
        "policy": policy,
        "hw_version": hw.version,
    }
    return g
