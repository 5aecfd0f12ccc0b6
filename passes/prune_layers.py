"""prune-layers: remove whole transformer layers, the least influential first."""

from __future__ import annotations

from kiln.errors import PassError
from kiln.ir import Graph
from kiln.prune import block_influence, layer_blocks, param_count

from .registry import count, register


@register("prune-layers", exact=False, phase="prune", requires=("fuse-attention",))
def prune_layers(graph: Graph, n: int = 1, layers: str = "", calib_windows: int = 4) -> Graph:
    """Matches: the residual stream of a model with sequential attention + MLP layers (run after
    fuse-attention, before kv-cache). Guarantees: `n` layers are gone, those with the lowest block
    influence (1 - cosine similarity of the block's input and output hidden states on calibration text;
    ShortGPT, Men et al., 2024), or exactly the layers listed in `layers` ("3/7"). A removed layer's output
    is replaced by its input; its weights and KV cache disappear. Lossy."""
    g = graph.copy()
    blocks = layer_blocks(g)
    L = len(blocks)
    if layers != "":
        try:
            chosen = sorted({int(x) for x in str(layers).split("/")})
        except ValueError:
            raise PassError(
                f"prune-layers: layers must be indices separated by '/', like 3/7, got {layers!r}"
            ) from None
        bad = [i for i in chosen if not 0 <= i < L]
        if bad:
            raise PassError(f"prune-layers: layer {bad[0]} does not exist; the model has layers 0..{L - 1}")
        n = len(chosen)
    n = int(n)
    if n < 0 or n >= L:
        raise PassError(
            f"prune-layers: n={n} would {'remove every one' if n >= L else 'be negative'} of the model's "
            f"{L} layers; use 0 <= n <= {L - 1}"
        )
    if n == 0:
        return g
    p0 = param_count(g)
    bi = None
    if layers == "":
        bi = block_influence(g, blocks, calib_windows)
        chosen = sorted(sorted(range(L), key=lambda i: bi[i])[:n])
    for i in sorted(chosen, reverse=True):  # last first: a later layer's input is an earlier one's output
        g.replace_all_uses(blocks[i].output, blocks[i].input)
        count("layers-removed")
    g.dce()
    prune = g.meta.setdefault("prune", {})
    kept = [i for i in range(L) if i not in chosen]
    for key in ("heads", "kv_heads", "ffn"):  # per-layer shapes recorded by earlier passes follow
        if key in prune and len(prune[key]) == L:
            prune[key] = [prune[key][i] for i in kept]
    prune["layers_removed"] = prune.get("layers_removed", []) + [f"{i}" for i in chosen]
    g.meta["pass_extra"] = {
        "removed": chosen,
        "block_influence": [round(b, 5) for b in bi] if bi else None,
        "layers_after": L - n,
        "params_before": p0,
        "params_after": param_count(g),
    }
    return g
