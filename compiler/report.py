"""The build report: what every pass did, what the build cost, what the artifact holds."""

from __future__ import annotations

import math
import re
from typing import Any


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _size(n: int) -> str:
    """MB, or kB below a megabyte (tiny models' layers)."""
    return _mb(n) if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _active(m: dict[str, Any]) -> str:
    """', N M active per token' for mixture-of-experts models (each token runs k of E experts)."""
    total, active = m.get("num_params", 0), m.get("active_params")
    return f", {active / 1e6:.2f}M active per token" if active is not None and active < total else ""


def _attention_kinds(layers: list[dict[str, Any]]) -> str:
    """Which layers attend globally and which through a sliding window (Mistral, Gemma-2/3 interleave
    them): the window is part of each fused attention, so a reader sees every layer was recognized."""
    if not layers:
        return "- attention: none fused"
    windows = [int(la.get("window") or 0) for la in layers]
    parts = [f"{windows.count(0)} global"] if 0 in windows else []
    for w in sorted(set(windows) - {0}):
        idx = [i for i, x in enumerate(windows) if x == w]
        parts.append(f"{len(idx)} sliding-window {w} (layers {', '.join(map(str, idx))})")
    return "- attention: " + ", ".join(parts)


def _resident_by_layer(weights: list[dict[str, Any]]) -> list[str]:
    """Resident weight bytes per transformer layer, compressed (2:4 layouts) against the dense layouts, when
    any field is compressed: the sparse kernels read the compressed fields as they are, so this is memory
    the loaded model holds, not only disk."""
    if not any("dense_bytes" in w for w in weights):
        return []
    rows: dict[str, list[int]] = {}
    for w in weights:
        m = re.search(r"layers\.(\d+)\.", w["name"])
        layer = m.group(1) if m else "other"
        got = int(math.prod(w["shape"])) * _ITEMSIZE.get(w["dtype"], 4)
        r = rows.setdefault(layer, [0, 0])
        r[0] += got
        r[1] += int(w.get("dense_bytes", got))
    order = sorted((k for k in rows if k != "other"), key=int) + (["other"] if "other" in rows else [])
    total = [sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())]
    lines = ["## Resident weights per layer", "", "| layer | resident | dense | ratio |", "|---|---|---|---|"]
    for k, (got, dense) in [(k, rows[k]) for k in order] + [("total", total)]:
        lines.append(f"| {k} | {_size(got)} | {_size(dense)} | {got / max(dense, 1):.2f}x |")
    return lines + [""]


def _plan(quant: dict[str, Any] | None) -> list[str]:
    """The per-weight quantization plan (mixed precision, `kiln tune`): one row per layer, one column per
    projection; weights outside the numbered layers (the output layer) in a row of their own."""
    plan = (quant or {}).get("plan")
    if not plan:
        return []
    rows: dict[str, dict[str, str]] = {}
    for name, scheme in plan.items():
        m = re.search(r"layers\.(\d+)\.(?:.*\.)?([^.]+)\.weight$", name)
        layer, proj = (m.group(1), m.group(2)) if m else ("other", name.removesuffix(".weight"))
        rows.setdefault(layer, {})[proj] = scheme
    cols = sorted({c for k, r in rows.items() if k != "other" for c in r})
    counts: dict[str, int] = {}
    for v in plan.values():
        counts[v] = counts.get(v, 0) + 1
    lines = [
        "## Quantization plan (per weight)",
        "",
        "- " + ", ".join(f"{k}: {v} weights" for k, v in sorted(counts.items())),
        "",
        "| layer | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for k in sorted((k for k in rows if k != "other"), key=int):
        lines.append(f"| {k} | " + " | ".join(rows[k].get(c, "-") for c in cols) + " |")
    for proj, scheme in sorted(rows.get("other", {}).items()):
        lines.append(f"| {proj} | {scheme} |" + " |" * (len(cols) - 1))
    return lines + [""]


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int8": 1, "uint8": 1, "int64": 8}


def render_report(
    m: dict[str, Any], kv_budget_gib: float = 1.0, batch: int = 1, context: int | None = None, chunk: int = 2048
) -> str:
    """Markdown report from a manifest (also what `kiln inspect` prints); the memory section is for `batch`
    sequences of `context` tokens (default: the artifact's max context)."""
    model = m.get("model", {})
    arch = model.get("architectures", ["?"])[0] if model.get("architectures") else model.get("model_type", "?")
    tgt = m["target"]
    where = tgt.get("mcpu") or tgt.get("arch") or tgt.get("functional", {}).get("mcpu", "")
    lines = [
        f"# kiln artifact: {m.get('name', '?')}",
        "",
        f"- model: {arch} from `{m.get('source', '?')}`, {m.get('num_params', 0) / 1e6:.1f}M parameters" + _active(m),
        f"- target: {tgt.get('name')} ({where}), "
        f"TVM {m.get('tvm_version')}, "
        f"kiln {m.get('kiln_version')}, schema {m.get('schema_version')}",
        f"- pipeline: `{m.get('pipeline')}`",
        f"- entry points: {', '.join(m.get('entry_points', {}))}; max context {m.get('max_context')} tokens",
        f"- weights: {_mb(m.get('weight_bytes', 0))} in {len(m.get('weights', []))} fields",
        f"- KV cache: {m['kv_cache']['page_size']}-token pages, {len(m['kv_cache']['layers'])} layers, "
        f"{m['kv_cache'].get('bytes_per_token', 0)} bytes per token ({m['kv_cache'].get('dtype')})",
    ]
    tp = m.get("tensor_parallel")
    if tp:  # the figures above are this rank's: its share of the weights, its KV heads
        more = [x for x in tp.get("members") or [] if x]
        lines.append(
            f"- tensor parallel: rank {tp.get('rank')} of {tp.get('ranks')}; weights and KV cache above are this "
            f"rank's share" + (f" (the other ranks: {', '.join(more)})" if more else "")
        )
    lines += [_attention_kinds(m["kv_cache"].get("layers", [])), ""]
    lines += _resident_by_layer(m.get("weights", []))
    lines += _plan(m.get("quantization"))
    tr = m.get("trace") or {}
    if tr.get("decomposed") or tr.get("attention_fallbacks") or tr.get("norm_fallbacks"):
        lines += ["## Trace", ""]
        if tr.get("decomposed"):
            lines.append("- decomposed by torch's tables: " + ", ".join(f"`{o}`" for o in tr["decomposed"]))
        for f in tr.get("attention_fallbacks") or []:
            lines.append(f"- attention left as plain ops at `{f['node']}` ({f['source']}): {f['reason']}")
        for f in tr.get("norm_fallbacks") or []:
            lines.append(f"- normalization left as plain ops at `{f['node']}` ({f['source']}): {f['reason']}")
        lines.append("")
    sim = m["target"].get("simulated")
    if sim:
        d = m["target"].get("decode", {})
        lines += [
            f"## Simulated decode step ({m['target'].get('hw_version')}, {m['target'].get('variant')} PIM, "
            f"batch {d.get('batch')}, context {d.get('context')})",
            "",
            "| system | step time | tokens/s | J/token |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['step_s'] * 1e3:.3f} ms | {v['tokens_per_s']:.0f} | {v['j_per_token']:.2e} |"
            for k, v in sim.items()
        ]
        lines.append("")
    lines += [
        "## Passes",
        "",
        "| # | pass | exact | rewrites | nodes | param bytes | FLOPs/token | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(m.get("passes", []), 1):
        rw = ", ".join(f"{k} {v}" for k, v in r["rewrites"].items()) or "-"
        params = "{" + ",".join(f"{k}={v}" for k, v in r["params"].items()) + "}" if r["params"] else ""
        lines.append(
            f"| {i} | {r['name']}{params} | {'yes' if r['exact'] else 'lossy'} | {rw} | "
            f"{r['nodes_before']} -> {r['nodes_after']} | {_mb(r['param_bytes_before'])} -> "
            f"{_mb(r['param_bytes_after'])} | {r['flops_per_token_before'] / 1e6:.1f}M -> "
            f"{r['flops_per_token_after'] / 1e6:.1f}M | {r['seconds']:.2f} |"
        )
    if m.get("kv_cache", {}).get("layers"):
        from .kvplan import render_plan

        lines += ["", "## KV-cache plan", "", render_plan(m["kv_cache"], kv_budget_gib).rstrip()]
    if m.get("kv_cache", {}).get("layers") or m.get("kv_cache", {}).get("state"):
        from .kvplan import render_memory

        ctx = int(context or m.get("max_context") or 2048)
        lines += ["", "## Memory", "", render_memory(m, batch, ctx, chunk).rstrip()]
    st = m.get("kv_cache", {}).get("state")
    if st:
        kinds = {k: sum(1 for lay in st["layers"] if lay["kind"] == k) for k in ("ssm", "conv")}
        lines += [
            "",
            "## Recurrent state",
            "",
            f"{kinds['ssm']} selective-scan and {kinds['conv']} convolution layers keep a fixed-size fp32 state per "
            f"sequence: **{st['bytes_per_sequence']:,} bytes**, whatever the context length (attention layers, if any, "
            "add their KV pages). Prefix caching and speculative decoding do not apply to these layers.",
        ]
    t = m.get("timings", {})
    if t:
        lines += ["", "## Build time (seconds)", "", "| phase | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in t.items()]
    if m["target"].get("notes"):
        lines += ["", "## Lowerings for this target", ""] + [f"- {n}" for n in m["target"]["notes"]]
    k = m.get("kernels", [])
    if k:
        lines += ["", f"## Kernels ({len(k)})", "", ", ".join(f"`{x}`" for x in k)]
    return "\n".join(lines) + "\n"
