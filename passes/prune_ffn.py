"""prune-ffn: remove hidden channels of feed-forward blocks (gate, up and down shrink together)."""

from __future__ import annotations

from kiln.ir import Graph
from kiln.prune import (
    counts_to_remove,
    ffn_groups,
    gather_evidence,
    group_scores,
    keep_slices,
    param_count,
    parse_ratio,
)

from .registry import count, register


@register("prune-ffn", exact=False, phase="prune")
def prune_ffn(
    graph: Graph, ratio=0.2, criterion: str = "wanda", scope: str = "layer", multiple: int = 32, calib_windows: int = 4
) -> Graph:
    """Matches: channel groups that live only between linear layers (the hidden units of an MLP, gated or
    not; found by following channels through elementwise ops, see kiln.prune.ffn_groups). Run before
    fuse-mlp. Guarantees: each group keeps its most important channels (criterion magnitude, wanda or
    taylor), about 1 - `ratio` of them, rounded to a multiple of `multiple` (the CPU kernels work in
    32-wide blocks); producer rows and biases and consumer columns shrink together. scope=layer prunes
    every layer by `ratio` (or by one ratio per layer, "0.1/0.3/..."); scope=global ranks channels across
    layers. Every layer keeps at least `multiple` channels (or all it had). Lossy."""
    g = graph.copy()
    groups = ffn_groups(g)
    r = parse_ratio(ratio, len(groups), "prune-ffn")
    if (r if isinstance(r, float) else max(r)) == 0.0 or not groups:
        return g
    p0 = param_count(g)
    ev = gather_evidence(
        g, criterion, [s.reader for grp in groups for s in grp.slices if s.reader is not None], calib_windows
    )
    scores = [group_scores(g, grp.slices, ev, criterion) for grp in groups]
    m = max(1, int(multiple))
    floor = [min(grp.size, m) for grp in groups]
    ranked = [s.sort() for s in scores]
    removal = counts_to_remove(
        [v[: grp.size - f] for (v, _), grp, f in zip(ranked, groups, floor)],
        r,
        [1] * len(groups),
        [grp.size for grp in groups],
        scope,
        "prune-ffn",
    )
    sizes = []
    for grp, (_, order), k in zip(groups, ranked, removal):
        keep = grp.size - k
        if k and keep < grp.size:  # round the kept count to the kernel's block width
            keep = min(grp.size, max(m, int(round(keep / m)) * m)) if m > 1 else keep
        sizes.append(keep)
        if keep == grp.size:
            continue
        kept = sorted(int(c) for c in order[grp.size - keep :])
        for s in grp.slices:
            keep_slices(g, s, kept)
        for n in grp.reshapes:
            shape = list(n.attrs["shape"])
            if not hasattr(shape[-1], "free_symbols") or not shape[-1].free_symbols:
                shape[-1] = keep if int(shape[-1]) != -1 else -1
            n.attrs = dict(n.attrs, shape=shape)
        count("ffn-channels-removed", grp.size - keep)
    g.reinfer()
    g.meta.setdefault("prune", {})["ffn"] = sizes
    g.meta["pass_extra"] = {
        "criterion": criterion,
        "scope": scope,
        "ffn": sizes,
        "params_before": p0,
        "params_after": param_count(g),
    }
    return g
