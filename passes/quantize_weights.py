"""quantize-weights: weight-only integer quantization of linear layers (RTN, GPTQ, AWQ)."""

from __future__ import annotations

import torch

from kiln.errors import PassError
from kiln.ir import Graph, Node
from kiln.log import get, step
from kiln.quant import awq_scales, clip_search, gptq, parse_scheme, quantize_with, rtn

from .qweights import fold_input_scale, is_lm_head, make_qweight
from .registry import count, register

log = get("quant")


@register("quantize-weights", exact=False, phase="quantize")
def quantize_weights(
    graph: Graph,
    scheme: str = "int8",
    method: str = "rtn",
    lm_head: str = "same",
    embedding: str = "tied",
    calib_windows: int = 8,
) -> Graph:
    """Matches: `linear` layers whose weight is a parameter (and the weights of `gated_mlp`, RTN only),
    and embedding tables.
    Guarantees: each weight becomes `qweight(codes, scales, zeros)` (value (q - z) * s) under the
    named scheme; `lm_head=none|same|<scheme>` sets the output layer apart; `embedding=tied` (default)
    makes a table tied to the output layer read the output layer's quantized weight (no second copy;
    untied tables, and tables of an AWQ-rescaled output layer, stay fp32), `none` keeps tables fp32,
    a scheme name quantizes them with RTN.
    method=rtn rounds to nearest; gptq and awq need calibration windows in graph.meta['calib_tokens']
    and run before fuse-mlp and kv-cache (they observe each linear's input). Lossy."""
    s = parse_scheme(scheme)
    head = None if lm_head == "none" else (s if lm_head == "same" else parse_scheme(lm_head))
    if method not in ("rtn", "gptq", "awq"):
        raise PassError(f"quantize-weights: method must be rtn, gptq or awq, got '{method}'")
    g = graph.copy()
    linears = [n for n in g.nodes if n.op == "linear" and n.inputs[1].op == "param"]
    if method != "rtn":
        if g.find("gated_mlp"):
            raise PassError(f"quantize-weights method={method} observes each linear's input: run it before fuse-mlp")
        if "calib_tokens" not in g.meta:
            raise PassError(
                f"quantize-weights method={method} needs calibration text: pass calib=... to "
                "kiln.compile (or --calib FILE to kiln build)"
            )
    plan = [(n, is_lm_head(g, n)) for n in linears]
    stats = {}
    if method != "rtn":
        from kiln.calib import collect_input_stats

        stats = collect_input_stats(
            g, list({n.inputs[0] for n, _ in plan}), g.meta["calib_tokens"][: int(calib_windows)]
        )
    awq_inputs: dict[Node, Node] = {}  # linear -> the node its calibration statistics were taken at
    awq_div: dict[Node, torch.Tensor] = {}  # linear -> the AWQ scale its input was divided by
    if method == "awq":
        groups: dict[Node, list[Node]] = {}
        for n, is_head in plan:
            if not is_head or head is not None:
                groups.setdefault(n.inputs[0], []).append(n)
        for gi, (x, users) in enumerate(groups.items(), 1):
            step(log, "awq: scales of layer group", gi, len(groups))
            ws = [g.params[u.inputs[1].attrs["name"]] for u in users]
            group_scheme = head if is_lm_head(g, users[0]) else s
            assert group_scheme is not None  # the output layer joins a group only when lm_head is quantized
            sc = awq_scales(ws, stats[x].mean_abs, stats[x].sample, group_scheme)
            new_x = fold_input_scale(g, x, users, sc)
            for u in users:
                p = u.inputs[1]
                scaled = g.add_param(p.attrs["name"] + ".awq", (g.params[p.attrs["name"]] * sc[None, :]).contiguous())
                u.inputs = [new_x, scaled] + u.inputs[2:]
                awq_inputs[u], awq_div[u] = x, sc[None, :]
        g.toposort()
    done: dict[str, Node] = {}
    for li, (n, is_head) in enumerate(plan, 1):
        step(log, f"{method}: quantizing layer", li, len(plan))
        sch = head if is_head else s
        if sch is None:
            continue
        p = n.inputs[1]
        name = p.attrs["name"]
        if name not in done:
            w = g.params[name].float()
            if method == "gptq":
                codes, sc, z = gptq(w, stats[n.inputs[0]].hessian, sch, X=stats[n.inputs[0]].sample)
            elif method == "awq":  # scaled weights; inputs seen by the layer are the sample / s
                st = stats[n.inputs[0]] if n.inputs[0] in stats else stats[awq_inputs[n]]
                sc, z = clip_search(w, st.sample / awq_div.get(n, 1.0), sch)
                codes = quantize_with(w, sc, z, sch).to(torch.uint8)
            else:
                codes, sc, z = rtn(w, sch)
            done[name] = make_qweight(g, name, w, sch, codes, sc, z, before=n)
        n.inputs = [n.inputs[0], done[name]] + n.inputs[2:]
        count(f"linear-{sch.name}")
    for n in g.find("gated_mlp"):
        for i in (1, 2, 3):
            p = n.inputs[i]
            if p.op != "param":
                continue
            name = p.attrs["name"]
            if name not in done:
                w = g.params[name].float()
                done[name] = make_qweight(g, name, w, s, *rtn(w, s), before=n)
            n.inputs[i] = done[name]
        count(f"mlp-{s.name}")
    emb_scheme = None
    for n in g.find("embedding"):
        p = n.inputs[0]
        if embedding == "none" or p.op != "param":
            continue
        name = p.attrs["name"]
        if embedding == "tied":
            if name in done:  # the output layer's codes, scales and zeros are the table
                n.inputs = [done[name], n.inputs[1]]
                emb_scheme = done[name].attrs["scheme"]
                count("embedding-tied")
            continue  # untied (or AWQ-rescaled output layer): the table stays fp32
        sch = parse_scheme(embedding)
        w = g.params[name].float()
        key = name + "#embedding"
        if key not in done:
            done[key] = make_qweight(g, name + ".emb", w, sch, *rtn(w, sch), before=n)
        n.inputs = [done[key], n.inputs[1]]
        emb_scheme = sch.name
        count(f"embedding-{sch.name}")
    g.dce()
    g.toposort()
    g.meta["quant"] = {
        "weights": s.to_json(),
        "method": method,
        "lm_head": head.to_json() if head else None,
        "embedding": emb_scheme,
    }
    return g
