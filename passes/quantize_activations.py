"""quantize-activations: W8A8 — dynamic per-token int8 activations with int8 weights, SmoothQuant-style."""

from __future__ import annotations

import torch

from kiln.errors import PassError
from kiln.ir import Graph, Node
from kiln.quant import parse_scheme, rtn

from .qweights import fold_input_scale, is_lm_head, make_qweight
from .registry import count, register


@register("quantize-activations", exact=False, phase="quantize")
def quantize_activations(graph: Graph, alpha: float = 0.5, calib_windows: int = 8, lm_head: str = "none") -> Graph:
    """Matches: `linear` layers with parameter weights (run before fuse-mlp and kv-cache).
    Guarantees: SmoothQuant (Xiao et al., 2023) migrates activation outliers into the weights with
    per-input-channel s = max|X|^alpha / max|W|^(1-alpha) (folded into the preceding RMSNorm weight
    where possible), then each linear reads `quant_act(x)` (per-token int8) and int8 per-channel
    weights. The output layer stays fp32 unless lm_head=int8. Needs calibration text. Lossy."""
    if "calib_tokens" not in graph.meta:
        raise PassError("quantize-activations needs calibration text: pass calib=... to kiln.compile")
    if graph.find("gated_mlp"):
        raise PassError("quantize-activations observes each linear's input: run it before fuse-mlp")
    from kiln.calib import collect_input_stats

    g = graph.copy()
    s8 = parse_scheme("int8")
    plan = [
        n
        for n in g.nodes
        if n.op == "linear" and n.inputs[1].op == "param" and (lm_head == "int8" or not is_lm_head(g, n))
    ]
    stats = collect_input_stats(g, list({n.inputs[0] for n in plan}), g.meta["calib_tokens"][: int(calib_windows)])
    groups: dict[Node, list[Node]] = {}
    for n in plan:
        groups.setdefault(n.inputs[0], []).append(n)
    for x, users in groups.items():
        wmax = torch.stack([g.params[u.inputs[1].attrs["name"]].abs().amax(0) for u in users]).amax(0)
        absmax = stats[x].absmax
        assert absmax is not None  # the calibration windows ran through every planned input
        s = (absmax.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)
        new_x = fold_input_scale(g, x, users, s)
        qa = g.add("quant_act", [new_x], name=x.name + "_q8", before=users[0])
        for u in users:
            name = u.inputs[1].attrs["name"]
            w = g.params[name] * s[None, :]
            qw = make_qweight(g, name + ".smooth", w, s8, *rtn(w, s8), before=u)
            u.inputs = [qa, qw] + u.inputs[2:]
            count("w8a8-linear")
    g.dce()
    g.toposort()
    g.meta["quant"] = {
        "activations": {"scheme": "int8_per_token_dynamic", "smooth_alpha": alpha},
        "weights": s8.to_json(),
        "method": "smoothquant+rtn",
    }
    return g
