"""quantize-weights: weight-only integer quantization of linear layers (RTN, GPTQ, AWQ)."""

from __future__ import annotations

import json
import os

import torch

from kiln.errors import PassError
from kiln.ir import Graph, Node
from kiln.log import get, step
from kiln.quant import WeightQuant, awq_scales, clip_search, gptq, integer_zero, parse_scheme, quantize_with, rtn

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
    plan: str | dict | None = None,
) -> Graph:
    """Matches: `linear` layers whose weight is a parameter (and the weights of `gated_mlp`, RTN only),
    and embedding tables.
    Guarantees: each weight becomes `qweight(codes, scales, zeros)` (value (q - z) * s) under the
    named scheme; `lm_head=none|same|<scheme>` sets the output layer apart; `embedding=tied` (default)
    makes a table tied to the output layer read the output layer's quantized weight (no second copy;
    untied tables, and tables of an AWQ-rescaled output layer, stay fp32), `none` keeps tables fp32,
    a scheme name quantizes them with RTN.
    method=rtn rounds to nearest; gptq and awq need calibration windows in graph.meta['calib_tokens']
    and run before fuse-mlp and kv-cache (they observe each linear's input).
    plan= (a JSON file, or a dict in Python) maps weight names to schemes, `none` keeping a weight fp32:
    mixed precision per projection; weights it does not name follow `scheme` / `lm_head`, and a tied
    embedding follows its output layer's entry.
    A `_floatzero` scheme falls back to integer zero points on weights that sparsify zeroed
    (graph.meta['sparsity']), so their zeros stay exactly 0 (the 2:4 kernels and compact storage rely
    on it). Lossy."""
    s = parse_scheme(scheme)
    head = None if lm_head == "none" else (s if lm_head == "same" else parse_scheme(lm_head))
    if method not in ("rtn", "gptq", "awq"):
        raise PassError(f"quantize-weights: method must be rtn, gptq or awq, got '{method}'")
    per_weight = _read_plan(plan)
    if per_weight and method == "awq":
        raise PassError("quantize-weights: plan= mixes schemes per weight with method rtn or gptq, not awq")
    g = graph.copy()
    linears = [n for n in g.nodes if n.op == "linear" and n.inputs[1].op == "param"]
    named = {n.inputs[1].attrs["name"] for n in linears} | {
        n.inputs[i].attrs["name"] for n in g.find("gated_mlp") for i in (1, 2, 3) if n.inputs[i].op == "param"
    }
    unknown = sorted(set(per_weight) - named)
    if unknown:
        raise PassError(
            f"quantize-weights plan names {len(unknown)} weight(s) no linear layer reads, e.g. '{unknown[0]}' "
            f"(weights here look like '{min(named, default='?')}')"
        )

    sparse = set(g.meta.get("sparsity", {}).get("params", {}))

    def scheme_of(name: str, default: WeightQuant | None) -> WeightQuant | None:
        sch = per_weight[name] if name in per_weight else default
        # a float zero point would turn pruned zeros into +-s/2: sparse weights keep an exact 0
        was_sparse = name in sparse or name.removesuffix(".awq") in sparse  # AWQ renames what it rescales
        return integer_zero(sch) if sch is not None and was_sparse else sch

    if method != "rtn":
        if g.find("gated_mlp"):
            raise PassError(f"quantize-weights method={method} observes each linear's input: run it before fuse-mlp")
        if "calib_tokens" not in g.meta:
            raise PassError(
                f"quantize-weights method={method} needs calibration text: pass calib=... to "
                "kiln.compile (or --calib FILE to kiln build)"
            )
    todo = [(n, is_lm_head(g, n)) for n in linears]
    stats = {}
    if method != "rtn":
        from kiln.calib import collect_input_stats

        stats = collect_input_stats(
            g, list({n.inputs[0] for n, _ in todo}), g.meta["calib_tokens"][: int(calib_windows)]
        )
    awq_inputs: dict[Node, Node] = {}  # linear -> the node its calibration statistics were taken at
    awq_div: dict[Node, torch.Tensor] = {}  # linear -> the AWQ scale its input was divided by
    if method == "awq":
        groups: dict[Node, list[Node]] = {}
        for n, is_head in todo:
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
    for li, (n, is_head) in enumerate(todo, 1):
        step(log, f"{method}: quantizing layer", li, len(todo))
        p = n.inputs[1]
        name = p.attrs["name"]
        sch = scheme_of(name, head if is_head else s)
        if sch is None:
            continue
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
        mlp_schemes = set()
        for i in (1, 2, 3):
            p = n.inputs[i]
            if p.op != "param":
                continue
            name = p.attrs["name"]
            sch = scheme_of(name, s)
            if sch is None:
                continue
            if name not in done:
                w = g.params[name].float()
                done[name] = make_qweight(g, name, w, sch, *rtn(w, sch), before=n)
            n.inputs[i] = done[name]
            mlp_schemes.add(sch.name)
        kinds = [n.inputs[i].attrs.get("scheme", "none") for i in (1, 2)]
        if kinds[0] != kinds[1]:
            raise PassError(
                f"quantize-weights plan: {n.name}'s gate and up weights run as one kernel; give them one scheme "
                f"(got {kinds[0]} and {kinds[1]}), or quantize before fuse-mlp"
            )
        for name in sorted(mlp_schemes):
            count(f"mlp-{name}")
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
    if per_weight:
        g.meta["quant"]["plan"] = {k: (v.name if v is not None else "none") for k, v in sorted(per_weight.items())}
    return g


def _read_plan(plan: str | dict | None) -> dict[str, WeightQuant | None]:
    """weight name -> scheme (None: keep fp32), from a dict or a JSON file holding one."""
    if plan is None or plan == "":
        return {}
    if isinstance(plan, str):
        if not os.path.exists(plan):
            raise PassError(f"quantize-weights: plan file {plan} does not exist (a JSON object: weight name -> scheme)")
        with open(plan) as f:
            try:
                plan = json.load(f)
            except json.JSONDecodeError as e:
                raise PassError(f"quantize-weights: plan file {plan} is not JSON ({e})") from e
    if not isinstance(plan, dict):
        raise PassError("quantize-weights: a plan is a JSON object mapping weight names to schemes or 'none'")
    plan = plan.get("plan", plan) if isinstance(plan.get("plan"), dict) else plan  # {"plan": {...}} works too
    return {str(k): (None if str(v) == "none" else parse_scheme(str(v))) for k, v in plan.items()}
