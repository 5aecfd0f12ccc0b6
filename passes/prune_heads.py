"""prune-heads: remove attention heads, whole KV groups or query heads within every group (GQA-consistent)."""

from __future__ import annotations

from kiln.errors import PassError
from kiln.ir import Graph
from kiln.prune import (
    counts_to_remove,
    gather_evidence,
    group_scores,
    head_groups,
    keep_slices,
    param_count,
    parse_ratio,
)

from .registry import count, register


@register("prune-heads", exact=False, phase="prune", requires=("fuse-attention",))
def prune_heads(
    graph: Graph, ratio=0.2, criterion: str = "wanda", unit: str = "auto", scope: str = "global", calib_windows: int = 4
) -> Graph:
    """Matches: every `attention` whose q/k/v come from separate linear layers through reshape/permute/rope
    and whose output reaches one output projection (run after fuse-attention, before fuse-mlp and kv-cache).
    Guarantees: about `ratio` of all query heads are gone, least important first (criterion magnitude,
    wanda or taylor; see kiln.prune). unit=group removes whole KV groups (a KV head and the query heads
    that read it); unit=query removes the same number of query heads from every group, so each query
    head still reads the KV head it read before (auto: query when a layer has several query heads per KV
    head, else group). scope=global ranks units across layers (layers end up with different head counts),
    scope=layer prunes each layer by `ratio`; `ratio` may also give one value per layer ("0.1/0.3/...").
    Projection rows and biases, output-projection columns and head counts in reshape attributes shrink
    together; every layer keeps at least one unit. Lossy."""
    g = graph.copy()
    groups = head_groups(g)
    r = parse_ratio(ratio, len(groups), "prune-heads")
    if unit not in ("auto", "group", "query"):
        raise PassError(f"prune-heads: unit must be auto, group or query, got {unit!r}")
    if (r if isinstance(r, float) else max(r)) == 0.0:
        return g
    p0 = param_count(g)
    ev = gather_evidence(
        g, criterion, [s.reader for hg in groups for s in hg.q + hg.kv if s.reader is not None], calib_windows
    )
    plans, scores, costs, totals = [], [], [], []
    for hg in groups:
        rep = hg.heads // hg.kv_heads
        qs = group_scores(g, hg.q, ev, criterion).view(hg.kv_heads, rep)  # [groups, query heads per group]
        mode = ("query" if rep > 1 else "group") if unit == "auto" else unit
        if mode == "query":
            if rep == 1:
                raise PassError(
                    f"prune-heads: layer {hg.layer} has one query head per KV head; unit=query would "
                    "empty a group, use unit=group"
                )
            order = qs.argsort(dim=1)  # ascending within each group
            units = qs.gather(1, order).sum(0)[: rep - 1]  # unit m: the m-th weakest head of every group
            plans.append((mode, order))
            costs.append(hg.kv_heads)
        else:
            kvs = group_scores(g, hg.kv, ev, criterion)
            units, order = (qs.sum(1) + kvs).sort()
            units = units[: hg.kv_heads - 1]
            plans.append((mode, order))
            costs.append(rep)
        scores.append(units)
        totals.append(hg.heads)
    removal = counts_to_remove(scores, r, costs, totals, scope, "prune-heads")
    shapes = []
    for hg, (mode, order), m in zip(groups, plans, removal):
        rep = hg.heads // hg.kv_heads
        if mode == "query":
            keep_kv = list(range(hg.kv_heads))
            keep_q = sorted(j * rep + int(h) for j in range(hg.kv_heads) for h in order[j, m:])
        else:
            keep_kv = sorted(int(j) for j in order[m:])
            keep_q = [j * rep + h for j in keep_kv for h in range(rep)]
        shapes.append((len(keep_q), len(keep_kv)))
        if m == 0:
            continue
        for s in hg.q:
            keep_slices(g, s, keep_q)
        for s in hg.kv:
            keep_slices(g, s, keep_kv)
        for node, idx, which in hg.reshapes:
            shape = list(node.attrs["shape"])
            try:
                if int(shape[idx]) == -1:
                    continue
            except TypeError:  # a symbolic entry is not a head count
                continue
            shape[idx] = {"q": len(keep_q), "kv": len(keep_kv), "o": len(keep_q) * hg.head_dim}[which]
            node.attrs = dict(node.attrs, shape=shape)
        count("heads-removed", hg.heads - len(keep_q))
        count("kv-heads-removed", hg.kv_heads - len(keep_kv))
    g.reinfer()
    prune = g.meta.setdefault("prune", {})
    prune["heads"] = [h for h, _ in shapes]
    prune["kv_heads"] = [k for _, k in shapes]
    g.meta["pass_extra"] = {
        "criterion": criterion,
        "unit": unit,
        "scope": scope,
        "heads": prune["heads"],
        "kv_heads": prune["kv_heads"],
        "params_before": p0,
        "params_after": param_count(g),
    }
    return g
