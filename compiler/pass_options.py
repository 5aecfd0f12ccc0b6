"""kiln.compile's short options that add passes to a pipeline: `attention=`, `prune=`, `sparsify=`,
`quant=` / `kv_quant=` / `w8a8=`. Each parser turns its option into pass steps; where they go in the
pipeline is decided by the phases the passes declare (see kiln.pipeline.insert_passes)."""

from __future__ import annotations

from .errors import PassError
from .pipeline import Step, check_pipeline, insert_passes, parse_pipeline, parse_value


def attention_steps(spec: str) -> list[Step]:
    """ "gqa:N" / "mqa" -> convert-gqa{kv_heads=N}; "mla:R" or "mla:R:ROPE_DIMS" -> convert-mla{rank=R,...}."""
    parts = spec.lower().split(":")
    try:
        if parts[0] in ("gqa", "mqa") and len(parts) <= 2:
            return [("convert-gqa", {"kv_heads": int(parts[1]) if len(parts) == 2 else 1})]
        if parts[0] == "mla" and len(parts) in (2, 3):
            rope = {"rope_dims": int(parts[2])} if len(parts) == 3 else {}
            return [("convert-mla", {"rank": int(parts[1]), **rope})]
    except ValueError:
        pass
    raise PassError(f"attention={spec!r} is not a conversion; use gqa:N, mqa, mla:RANK or mla:RANK:ROPE_DIMS")


def pruning_steps(prune: str | None = None, sparsify: str | None = None, method: str = "wanda") -> list[Step]:
    """`prune`: pass names ("prune-heads{ratio=0.2},prune-ffn{ratio=0.2}", kept in that order) or the short
    form "heads=0.2,ffn=0.2,layers=2" (layers first: blocks are ranked on the unpruned model);
    `sparsify`: a ratio ("0.5") or an N:M pattern ("2:4"), pruned with `method`."""
    add: list[Step] = []
    if prune:
        if "prune-" in prune:
            add += parse_pipeline(prune)
        else:
            short = {"layers": ("prune-layers", "n"), "heads": ("prune-heads", "ratio"), "ffn": ("prune-ffn", "ratio")}
            for item in prune.split(","):
                k, _, v = item.partition("=")
                if k.strip() not in short or len(v.split()) != 1 or "=" in v:  # one value per item, nothing skipped
                    raise PassError(
                        f"prune={prune!r}: expected items like heads=0.2, ffn=0.2, layers=2, or pass names "
                        "like prune-heads{ratio=0.2}"
                    )
                name, key = short[k.strip()]
                add.append((name, {key: parse_value(v.strip())}))
            add.sort(key=lambda s: s[0] != "prune-layers")
    if sparsify:
        s = str(sparsify)
        add.append(
            ("sparsify", {"pattern": s, "method": method} if ":" in s else {"ratio": parse_value(s), "method": method})
        )
    return add


def quantization_steps(
    quant: str | None = None,
    method: str = "rtn",
    kv: str | None = None,
    activations: bool = False,
    lm_head: str = "same",
    plan: str | None = None,
) -> list[Step]:
    """W8A8 (`activations`, which then quantizes the weights too) or weights under scheme `quant`
    (`method` rtn|awq|gptq, `lm_head` none|same|<scheme>; `plan` a JSON file of per-weight schemes, see
    quantize-weights); then the KV cache as `kv`."""
    add: list[Step] = []
    if activations:
        add.append(("quantize-activations", {}))
    elif quant or plan:
        add.append(
            (
                "quantize-weights",
                {
                    "scheme": quant or "int8",
                    "method": method,
                    **({"lm_head": lm_head} if lm_head != "same" else {}),
                    **({"plan": plan} if plan else {}),
                },
            )
        )
    if kv:
        add.append(("quantize-kv", {"dtype": kv}))
    return add


def build_pipeline(
    passes: str,
    *,
    attention: str | None = None,
    prune: str | None = None,
    sparsify: str | None = None,
    sparsify_method: str = "wanda",
    quant: str | None = None,
    quant_method: str = "rtn",
    kv_quant: str | None = None,
    w8a8: bool = False,
    lm_head: str = "same",
    quant_plan: str | None = None,
) -> str:
    """`passes` with the passes the options ask for, checked for a freshly traced graph so that a bad
    pipeline is refused before the model is traced. Without options `passes` comes back as written
    (O1 stays O1 in the manifest)."""
    steps = (attention_steps(attention) if attention else []) + pruning_steps(prune, sparsify, sparsify_method)
    steps += quantization_steps(quant, quant_method, kv_quant, w8a8, lm_head, quant_plan)
    out = insert_passes(passes, steps) if steps else passes
    check_pipeline(parse_pipeline(out))
    return out
