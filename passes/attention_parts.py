"""What the attention rewrites share: where an attention's keys and values come from, and the checks
and parameter edits convert-gqa and convert-mla both make."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.errors import PassError
from kiln.ir import Graph, Node, ttype


@dataclass
class KVProjection:
    """Where one attention's keys or values come from: `linear(x, w[, b])` -> reshape -> permute (-> rope)."""

    linear: Node
    reshape: Node
    permute: Node
    rope: Node | None


def kv_projection(att: Node, which: int, who: str) -> KVProjection:
    """Trace attention input `which` (1 = keys, 2 = values) back to its projection, or explain why not."""
    n = att.inputs[which]
    rope = None
    if n.op == "rope":
        rope, n = n, n.inputs[0]
    perm = n
    resh = perm.inputs[0] if perm.op == "permute" else None
    lin = resh.inputs[0] if resh is not None and resh.op == "reshape" else None
    if resh is None or lin is None or lin.op != "linear" or list(perm.attrs["perm"]) != [0, 2, 1, 3]:
        raise PassError(
            f"{who}: the {'keys' if which == 1 else 'values'} of %{att.name} (from {att.source}) are "
            "not a per-head view of one linear projection (linear -> reshape -> permute); models "
            "with a fused QKV projection (GPT-2's c_attn) are not supported"
        )
    if lin.inputs[1].op != "param":
        raise PassError(
            f"{who}: the projection %{lin.name} has a {lin.inputs[1].op} weight; run {who} before quantization passes"
        )
    return KVProjection(lin, resh, perm, rope)


def replace_param(g: Graph, p: Node, tensor: torch.Tensor) -> None:
    """Give parameter node `p` a new tensor (the graph's params are copy-on-write)."""
    g.params[p.attrs["name"]] = tensor.contiguous()
    p.type = ttype(tuple(tensor.shape), p.type.dtype)


def check_full_sequence(graph: Graph, who: str) -> None:
    if graph.find("cached_attention") or graph.find("cached_mla_attention"):
        raise PassError(f"{who} rewrites the full-sequence attention: place it before kv-cache")
    if not graph.find("attention"):
        raise PassError(f"{who}: the graph has no attention op; run fuse-attention first")
