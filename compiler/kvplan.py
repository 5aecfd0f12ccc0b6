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
