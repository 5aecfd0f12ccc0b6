"""kiln vs transformers on the same real weights: next-token logits and perplexity on Lee-corpus windows.

    .venv/bin/python bench/real_model_agreement.py [--model gemma3-270m] [--quant int8] [--windows 4] [--window 256]

Evaluation text: `lee_background.cor` from token 8192 on (calibration texts stay before it). Each window
runs through kiln's `verify` entry (every position's logits) and through transformers' full forward.
One extra window is longer than the model's sliding window (when it has one): its first part is
prefilled and the rest verified against the cache, so the sliding layers must drop what they no longer
see. Prints max |logit difference|, mean KL(transformers || kiln) per token, argmax agreement and both
perplexities, and writes bench/results/NAME.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import numpy as np
import torch

EVAL_START = 8192  # tokens of lee_background.cor before this are left to calibration


def _kiln_logits(eng, ids: list[int], split: int) -> torch.Tensor:
    """Logits [len(ids) - split, vocab] of positions split.. (positions before `split` are prefilled)."""
    pages = eng.pool.alloc(eng.pool.pages_for(len(ids)))
    try:
        if split:
            eng.prefill(ids[:split], pages)
        rest = ids[split:]
        out = eng.verify([rest], [list(range(split, len(ids)))], [pages])
        return torch.from_numpy(np.ascontiguousarray(out[0])).double()
    finally:
        eng.pool.release(pages)


def _compare(ref: torch.Tensor, got: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """ref/got: [n, vocab] logits of the same positions; targets: [n - 1] next tokens."""
    lr, lg = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    return {
        "max_abs": float((ref - got).abs().max()),
        "kl_sum": float((lr.exp() * (lr - lg)).sum()),
        "argmax_same": int((ref.argmax(-1) == got.argmax(-1)).sum()),
        "n": ref.shape[0],
        "nll_ref": -float(lr[:-1].gather(1, targets[:, None]).sum()),
        "nll_kiln": -float(lg[:-1].gather(1, targets[:, None]).sum()),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--artifact", default=None, help="reuse a built artifact (default: cached build)")
    ap.add_argument("--quant", default=None, help="a weight scheme for the build (int8, int4_g32, ...)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--out", default=None, help="results name: bench/results/NAME.json")
    a = ap.parse_args()
    import kiln
    from kiln.calib import lee_corpus
    from kiln.models import load_model

    lm = load_model(a.model)
    kw = {"quant": a.quant} if a.quant else {}
    art = a.artifact or kiln.cached_build(a.model, os.path.join(tempfile.mkdtemp(), "art"), **kw)[0]
    eng = kiln.load(art, kv_cache_tokens=8192)
    ids = lm.tokenizer(lee_corpus("lee_background.cor"))["input_ids"]
    bos = [lm.tokenizer.bos_token_id] if lm.tokenizer.bos_token_id is not None else []
    wins = [(bos + ids[EVAL_START + i * a.window : EVAL_START + (i + 1) * a.window], 0) for i in range(a.windows)]
    sw = getattr(lm.model.config, "sliding_window", None)
    if sw:  # one window past the sliding window: prefill sw tokens, verify the next `window`
        start = EVAL_START + a.windows * a.window
        wins.append((bos + ids[start : start + sw + a.window], sw + len(bos)))
    rows = []
    for w, split in wins:
        with torch.no_grad():
            ref = lm.model(input_ids=torch.tensor([w]), use_cache=False).logits[0, split:].double()
        got = _kiln_logits(eng, w, split)
        rows.append(dict(_compare(ref, got, torch.tensor(w[split + 1 :])), tokens=len(w), split=split))
        r = rows[-1]
        print(
            f"window of {len(w)} tokens (scored from {split}): max |dlogit| {r['max_abs']:.2e}, "
            f"KL {r['kl_sum'] / r['n']:.2e}/token, argmax same {r['argmax_same']}/{r['n']}",
            flush=True,
        )
    n_pred = sum(r["n"] - 1 for r in rows)
    summary = {
        "model": a.model,
        "quant": a.quant,
        "eval_text": f"lee_background.cor tokens from {EVAL_START}, {a.windows} windows of {a.window} (+BOS)"
        + (f" and one of {sw + a.window} scored after position {sw}" if sw else ""),
        "max_abs_logit_diff": max(r["max_abs"] for r in rows),
        "mean_kl_per_token": sum(r["kl_sum"] for r in rows) / sum(r["n"] for r in rows),
        "argmax_agreement": sum(r["argmax_same"] for r in rows) / sum(r["n"] for r in rows),
        "ppl_transformers": math.exp(sum(r["nll_ref"] for r in rows) / n_pred),
        "ppl_kiln": math.exp(sum(r["nll_kiln"] for r in rows) / n_pred),
        "windows": rows,
    }
    print("\n| measure | value |\n|---|---|")
    for k in ("max_abs_logit_diff", "mean_kl_per_token", "argmax_agreement", "ppl_transformers", "ppl_kiln"):
        print(f"| {k} | {summary[k]:.4g} |")
    from results_io import write_results

    write_results(a.out or f"agreement_{a.model}" + (f"_{a.quant}" if a.quant else ""), summary)
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
