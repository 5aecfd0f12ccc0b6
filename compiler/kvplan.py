"""KV-cache planner: how many sequences of what context fit a memory budget, per attention variant and
KV dtype.

The bytes per token of a layer follow from its cache layout: 2 x kv_heads x head_dim values for
MHA/GQA/MQA (keys and values), rank + kv_heads x rope_dims for MLA (one latent row), each value of
`bytes` bytes, plus one fp32 scale per token and head for the 8-bit caches (int8, fp8 e4m3: keys and
values each carry one). Pages round each sequence up to whole pages.
"""

from __future__ import annotations

from typing import Any

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "fp8": 1}


def bytes_per_token(layers: list[dict[str, Any]], dtype: str, variant: str = "as built") -> int:
    """Cache bytes per token over all layers for `variant` ("as built", "mha", "gqa:N", "mqa")."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    size, scaled = DTYPE_BYTES[dtype], dtype in ("int8", "fp8")
    total = 0
    for lay in layers:
        if variant == "as built" and lay.get("mla_rank"):
            total += (lay["mla_rank"] + lay["kv_heads"] * lay["rope_dims"]) * size + (4 if scaled else 0)
            continue
        kvh = {"as built": lay["kv_heads"], "mha": lay["num_heads"], "mqa": 1}.get(variant)
        if kvh is None:
            kvh = int(variant.split(":")[1])
        total += 2 * kvh * lay["head_dim"] * size + (2 * kvh * 4 if scaled else 0)
    return total


def plan(
    layers: list[dict[str, Any]],
    budget_bytes: int,
    page_size: int,
    contexts=(2048, 8192, 32768),
    dtypes=("fp32", "fp16", "int8", "fp8"),
) -> list[dict[str, Any]]:
    """Rows {variant, dtype, bytes_per_token, max_tokens, batch_at: {context: max batch}}: the cache
    variants comparable to the model as built (its own layout, then MHA/GQA/MQA head counts)."""
    variants = ["as built"]
    mla = any(lay.get("mla_rank") for lay in layers)
    heads, kvh = layers[0]["num_heads"], layers[0]["kv_heads"]
    if not mla:
        variants += [
            v
            for v in (["mha"] if kvh != heads else [])
            + [f"gqa:{d}" for d in range(2, kvh) if kvh % d == 0]
            + (["mqa"] if kvh != 1 else [])
        ]
    rows = []
    for v in variants:
        for dt in dtypes:
            bpt = bytes_per_token(layers, dt, v)
            page = bpt * page_size
            pages = budget_bytes // page
            rows.append(
                {
                    "variant": v,
                    "dtype": dt,
                    "bytes_per_token": bpt,
                    "max_tokens": pages * page_size,
                    "batch_at": {c: pages // -(-c // page_size) for c in contexts},
                }
            )
    return rows


def render_plan(kv: dict[str, Any], budget_gib: float = 1.0, contexts=(2048, 8192, 32768)) -> str:
    """Markdown table of `plan` for a manifest's kv_cache entry."""
    layers, ps = kv["layers"], kv["page_size"]
    built = kv.get("dtype", "float32")
    rows = plan(layers, int(budget_gib * 2**30), ps, contexts)
    mla = layers[0].get("mla_rank")
    name = (f"MLA r={mla}" if mla else f"{layers[0]['kv_heads']} KV heads") + f", built {built}"
    out = [
        f"KV-cache plan for a {budget_gib:g} GiB budget ({len(layers)} layers, {ps}-token pages; as built: {name}; "
        "other rows: the same model with that head count; 8-bit rows include their fp32 scales)",
        "",
        "| attention | KV dtype | bytes/token | max tokens | "
        + " | ".join(f"max batch @ {c}" for c in contexts)
        + " |",
        "|---|---|---|---|" + "---|" * len(contexts),
    ]
    for r in rows:
        out.append(
            f"| {r['variant']} | {r['dtype']} | {r['bytes_per_token']} | {r['max_tokens']} | "
            + " | ".join(str(r["batch_at"][c]) for c in contexts)
            + " |"
        )
    return "\n".join(out) + "\n"


def memory_needs(m: dict[str, Any], batch: int, context: int, chunk: int = 2048) -> dict[str, int]:
    """Device memory (bytes) an artifact needs to serve `batch` sequences of `context` tokens, prompts
    prefilled in chunks of `chunk` tokens: weights and KV cache exactly (pages round each sequence up), the
    largest transient buffers of one step estimated from the model's shapes and what the target records:
    `prefill_scores_bytes` per attention score element when its prefill attention materializes the
    [heads, tokens, context] scores (the cuda target: fp32 scores and mask, fp16 probabilities), and
    `prefill_gathers_kv` when prefill first copies a sequence's K/V pages out of the paged cache."""
    kv = m["kv_cache"]
    cfg = m.get("model", {})
    ps = int(kv["page_size"])
    tgt = m.get("target", {})
    hidden = int(cfg.get("hidden_size") or 0)
    ffn = int(cfg.get("intermediate_size") or 4 * hidden)
    heads = int(cfg.get("num_attention_heads") or 0)
    vocab = int(cfg.get("vocab_size") or 0)
    chunk = max(1, min(chunk, context))
    span = -(-context // ps) * ps
    lay = kv.get("layers") or [{}]
    kvh, hd = int(lay[0].get("kv_heads", 0)), int(lay[0].get("head_dim", 0))
    scores = heads * chunk * span * int(tgt.get("prefill_scores_bytes", 0))
    gather = 2 * kvh * span * hd * 2 if tgt.get("prefill_gathers_kv") else 0
    # fp32 activations of one layer for the chunk: residual, norm, q/k/v/o (~4 x hidden), gate, up, act (3 x ffn)
    acts = chunk * (4 * hidden + 3 * ffn) * 4
    out = {
        "weights": int(m.get("weight_bytes", 0)),
        "kv_cache": batch * span * int(kv.get("bytes_per_token", 0)),
        "prefill_workspace": scores + gather + acts,
        "logits": max(batch, 1) * vocab * 4,
    }
    if kv.get("state_bytes_per_sequence"):  # state-space layers: a fixed state per sequence, any context
        out["recurrent_state"] = batch * int(kv["state_bytes_per_sequence"])
    out["total"] = sum(out.values())
    return out


def render_memory(m: dict[str, Any], batch: int, context: int, chunk: int = 2048) -> str:
    """Markdown lines of `memory_needs`."""
    need = memory_needs(m, batch, context, chunk)
    where = "GPU" if m.get("target", {}).get("name") == "cuda" else "device"
    out = [
        f"{where} memory for batch {batch} x context {context} (prompts prefilled in chunks of "
        f"{min(chunk, context)} tokens): **{need['total'] / 2**30:.2f} GiB**",
        "",
        "| part | GiB |",
        "|---|---|",
    ]
    out += [f"| {k.replace('_', ' ')} | {v / 2**30:.3f} |" for k, v in need.items() if k != "total"]
    out.append(
        "\nweights and KV cache are exact; the workspace is the largest step's transient buffers estimated from "
        "the shapes (the runtime's allocator may hold more)"
    )
    return "\n".join(out) + "\n"
