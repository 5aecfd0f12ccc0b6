"""convert-mla: compress keys and values into one low-rank latent per token (MHA/GQA -> MLA).

Multi-head latent attention (DeepSeek-AI, 2024, "DeepSeek-V2") caches one latent vector per token and
expands keys and values from it with up-projections, which decode absorbs into the query and output
paths. Rotary embeddings stand in the way of absorption (the rotation depends on the key's position),
so, as in MHA2MLA (Ji et al., 2025) and TransMLA (Meng et al., 2025), a few rotary frequencies per head
are kept as a small decoupled rotary key and the rest lose their rotation ("partial RoPE"): we keep the
`rope_dims / 2` highest frequencies (the pairs (i, i + D/2) for i < rope_dims / 2, MHA2MLA's
high-frequency choice). The non-rotary key dims and the values of all KV heads are stacked and
factored by a truncated SVD, W ~ U_r S_r V_r^T: the down-projection sqrt(S_r) V_r^T makes the latent,
U_r sqrt(S_r) split into the key and value up-projections. With calibration text attached
(`graph.meta["calib_tokens"]`, e.g. `kiln.compile(..., calib="lee")`) the SVD is activation-aware.
"""

from __future__ import annotations

import torch

from kiln.errors import PassError
from kiln.ir import Graph, Node

from .attention_parts import check_full_sequence, kv_projection
from .registry import count, register


def _slice(g: Graph, x: Node, start: int, end: int, before: Node) -> Node:
    return g.add("slice", [x], {"dim": 3, "start": start, "end": end, "step": 1}, name="mla_slice", before=before)


def _rope_part(g: Graph, x: Node, n: int, half: int, before: Node) -> Node:
    """The rotary pairs i < n of a [.., D] tensor in rotate_half layout: x[..., :n] ++ x[..., half:half+n]."""
    return g.add(
        "cat",
        [_slice(g, x, 0, n, before), _slice(g, x, half, half + n, before)],
        {"dim": -1},
        name="mla_rope_part",
        before=before,
    )


def _nope_part(g: Graph, x: Node, n: int, half: int, before: Node) -> Node:
    if n == half:
        return _slice(g, x, 0, 0, before)  # every dim stays rotary: an empty non-rotary part
    return g.add(
        "cat",
        [_slice(g, x, n, half, before), _slice(g, x, half + n, 2 * half, before)],
        {"dim": -1},
        name="mla_nope_part",
        before=before,
    )


def _rows(heads: int, d: int, idx: list[int]) -> list[int]:
    return [h * d + i for h in range(heads) for i in idx]


def mla_factor(
    wk_nope: torch.Tensor, wv: torch.Tensor, rank: int, xtx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of the stacked projections [Wk_nope; Wv] ([rows, d]) -> (down [r, d], up_k, up_v).

    With the inputs' second moment `xtx` (X^T X [d, d]) the SVD is of W L, L the Cholesky factor of
    X^T X, so truncation minimizes the error of the projected activations ||(W - W_r) X|| instead of
    the weights' (activation-aware SVD, as in SVD-LLM, Wang et al., 2024); down then ends in L^-1."""
    m = torch.cat([wk_nope, wv], 0).double()
    if xtx is not None:
        c = xtx.double()
        c = c + 1e-4 * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)  # damping: keep it definite
        L = torch.linalg.cholesky(c)
        u, s, vh = torch.linalg.svd(m @ L, full_matrices=False)
        vh = vh @ torch.linalg.inv(L)
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    down = root[:, None] * vh[:rank]
    up = u[:, :rank] * root[None, :]
    return down.float(), up[: wk_nope.shape[0]].float(), up[wk_nope.shape[0] :].float()


# needs fuse-rope too, but not declared: the pass itself explains that models without RoPE cannot convert
@register("convert-mla", exact=False, phase="convert", requires=("fuse-attention",))
def convert_mla(graph: Graph, rank: int = 0, rope_dims: int = 8) -> Graph:
    """Matches: every `attention` with rotary q/k (fuse-rope, fuse-attention) whose keys and values are
    per-head views of bias-free linear projections of the same input; run before kv-cache and before
    quantization. Guarantees: each becomes `mla_attention(q_nope, q_rope, c, k_rope, w_uk, w_uv)` with
    c = linear(x, W_down) [.., rank] and a rotary key of `rope_dims` dims per KV head; kv-cache then
    caches only [c | k_rope] per token. Exact when rope_dims equals head_dim and rank is at least the
    stacked projections' rank (kv_heads * 2 * head_dim or the model width); otherwise lossy (partial
    RoPE plus truncation; recover with `kiln.distill`)."""
    check_full_sequence(graph, "convert-mla")
    g = graph.copy()
    rank, rope_dims = int(rank), int(rope_dims)
    stats = {}
    if g.meta.get("calib_tokens"):  # activation-aware factorization from the calibration text
        from kiln.calib import collect_input_stats

        xs = list(dict.fromkeys(kv_projection(a, 1, "convert-mla").linear.inputs[0] for a in g.find("attention")))
        stats = {n: st.H for n, st in collect_input_stats(g, xs, g.meta["calib_tokens"], keep_rows=0).items()}
        count("activation-aware", len(stats))
    for att in g.find("attention"):
        q, k, v = att.inputs
        if q.op != "rope" or k.op != "rope":
            raise PassError(
                f"convert-mla: the queries/keys of %{att.name} (from {att.source}) are not rotary "
                "embeddings recognized by fuse-rope; run fuse-rope first (models without RoPE "
                "are not supported)"
            )
        if att.attrs["kv_dtype"]:
            raise PassError("convert-mla: place it before quantize-kv (the latent cache is fp32)")
        if att.attrs["softcap"]:
            raise PassError(
                f"convert-mla: %{att.name} (from {att.source}) softcaps its scores, which latent attention "
                "does not; leave convert-mla out for this model"
            )
        pk, pv = kv_projection(att, 1, "convert-mla"), kv_projection(att, 2, "convert-mla")
        x = pk.linear.inputs[0]
        if pv.linear.inputs[0] is not x:
            raise PassError(f"convert-mla: keys and values of %{att.name} project different inputs")
        if pk.linear.input("bias") is not None or pv.linear.input("bias") is not None:
            raise PassError(
                f"convert-mla: the key/value projections of %{att.name} have biases (Qwen2); "
                "only bias-free projections can be factored into a latent"
            )
        kvh, d = int(k.type.shape[1]), int(k.type.shape[3])
        dv, width = int(v.type.shape[3]), int(x.type.shape[-1])
        half = d // 2
        if rope_dims < 2 or rope_dims % 2 or rope_dims > d:
            raise PassError(f"convert-mla: rope_dims={rope_dims} must be even and between 2 and head_dim={d}")
        n = rope_dims // 2
        dn = d - rope_dims
        full = min(kvh * (dn + dv), width)
        if rank < 1 or rank > full:
            raise PassError(
                f"convert-mla: rank={rank} is impossible for %{att.name}: the stacked key/value "
                f"projections [{kvh * (dn + dv)}, {width}] have rank at most {full}; choose 1..{full}"
            )
        wk = g.params[pk.linear.inputs[1].attrs["name"]]
        wv = g.params[pv.linear.inputs[1].attrs["name"]]
        rope_idx = list(range(n)) + list(range(half, half + n))
        nope_idx = [i for i in range(d) if i not in rope_idx]
        down, up_k, up_v = mla_factor(wk[_rows(kvh, d, nope_idx)], wv, rank, stats.get(x))
        layer = len(g.find("mla_attention"))
        base = f"mla.{layer}"
        p_down = g.add_param(f"{base}.kv_down", down)
        p_kr = g.add_param(f"{base}.k_rope", wk[_rows(kvh, d, rope_idx)].clone())
        p_uk = g.add_param(f"{base}.k_up", up_k.reshape(kvh, dn, rank).contiguous())
        p_uv = g.add_param(f"{base}.v_up", up_v.reshape(kvh, dv, rank).contiguous())
        qf, cos, sin = q.inputs
        cos_r, sin_r = _rope_part(g, cos, n, half, att), _rope_part(g, sin, n, half, att)
        q_rope = g.add("rope", [_rope_part(g, qf, n, half, att), cos_r, sin_r], name="mla_q_rope", before=att)
        q_nope = _nope_part(g, qf, n, half, att)
        c = g.add("linear", [x, p_down], name="mla_latent", before=att, source=pk.linear.source)
        kr = g.add("linear", [x, p_kr], name="mla_k_rope", before=att, source=pk.linear.source)
        shape = list(pk.reshape.attrs["shape"])
        kr = g.add("reshape", [kr], {"shape": shape[:2] + [kvh, rope_dims]}, name="mla_k_rope_heads", before=att)
        kr = g.add("permute", [kr], {"perm": [0, 2, 1, 3]}, name="mla_k_rope_t", before=att)
        kr = g.add("rope", [kr, cos_r, sin_r], name="mla_k_rope_rot", before=att)
        mla = g.add(
            "mla_attention",
            [q_nope, q_rope, c, kr, p_uk, p_uv],
            {"scale": att.attrs["scale"], "window": att.attrs["window"], "rank": rank, "alibi": att.attrs["alibi"]},
            name="mla_attention",
            before=att,
            source=att.source,
        )
        g.replace_all_uses(att, mla)
        g.nodes.remove(att)
        count("mla", 1)
    g.dce()
    g.toposort()
    g.meta["attention_variant"] = {"kind": "mla", "rank": rank, "rope_dims": rope_dims}
    return g
