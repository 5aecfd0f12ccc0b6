"""convert-gqa: merge key/value heads into fewer groups (MHA -> GQA, GQA -> fewer groups, MQA with 1).

Each new KV head is the mean of the projection weights (and biases) of the old heads it replaces, the
initialization that Ainslie et al. (2023, "GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints") found best before uptraining. Rotary embeddings are linear and the same for
every head, so mean-pooling the weights mean-pools the rotated keys too.
"""

from __future__ import annotations

import torch

from kiln.errors import PassError
from kiln.ir import Graph

from .attention_parts import check_full_sequence, kv_projection, replace_param
from .registry import count, register


def _pool(t: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """[heads * D, ...] -> [groups * D, ...]: mean over each run of heads // groups consecutive heads."""
    rest = t.shape[1:]
    return t.reshape(groups, heads // groups, -1, *rest).mean(1).reshape(-1, *rest)


@register("convert-gqa", exact=False, phase="convert", requires=("fuse-attention",))
def convert_gqa(graph: Graph, kv_heads: int = 1) -> Graph:
    """Matches: every `attention` whose keys and values are per-head views of linear projections
    (run fuse-attention, before kv-cache and quantization). Guarantees: each layer has `kv_heads` KV
    heads; new head g is the mean of old heads g*m .. g*m+m-1 (m = old kv heads / kv_heads), so query
    head h keeps reading the merged group that contains its old head. Exact when kv_heads equals the
    model's; lossy otherwise (recover with `kiln.distill`)."""
    check_full_sequence(graph, "convert-gqa")
    kv_heads = int(kv_heads)
    g = graph.copy()
    for att in g.find("attention"):
        heads, old = int(att.inputs[0].type.shape[1]), int(att.inputs[1].type.shape[1])
        if kv_heads < 1 or old % kv_heads:
            ok = ", ".join(str(d) for d in range(1, old + 1) if old % d == 0)
            raise PassError(
                f"convert-gqa: kv_heads={kv_heads} does not divide the {old} KV heads of %{att.name} "
                f"({heads} query heads); choose one of {ok}"
            )
        if kv_heads == old:
            continue
        for which in (1, 2):
            proj = kv_projection(att, which, "convert-gqa")
            w = proj.linear.inputs[1]
            replace_param(g, w, _pool(g.params[w.attrs["name"]], old, kv_heads))
            b = proj.linear.input("bias")
            if b is not None:
                replace_param(g, b, _pool(g.params[b.attrs["name"]], old, kv_heads))
            shape = list(proj.reshape.attrs["shape"])
            proj.reshape.attrs["shape"] = shape[:2] + [-1] + shape[3:]
        count("kv-heads-merged", old - kv_heads)
    g.reinfer()
    g.meta["attention_variant"] = {"kind": "mqa" if kv_heads == 1 else "gqa", "kv_heads": kv_heads}
    return g
