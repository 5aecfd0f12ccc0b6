"""KV-cache bytes per token and held-out perplexity of attention conversions on SmolLM2-135M, before and
after a short distillation recovery (`kiln.distill`, teacher = the original model).

    .venv/bin/python bench/kv_convert.py [--steps 24] [--eval-windows 4] [--configs ...]

Distillation and calibration text: the Lee corpus `lee.cor`; perplexity: held-out windows of `lee_background.cor`
(256 tokens each), both through the reference interpreter (fp32). Bytes per token are those of the
artifact's paged cache (fp32, all 30 layers), derived by the kv-cache pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CONFIGS = ["convert-gqa{kv_heads=1}", "convert-mla{rank=96,rope_dims=32}", "convert-mla{rank=160,rope_dims=32}"]
FRONT = "canonicalize,fuse-norms,fuse-rope,fuse-attention,fuse-mlp"


def kv_bytes_per_token(g) -> int:
    import kiln
    from kiln.artifact import kv_summary

    cached, _ = kiln.run_pipeline(g, "kv-cache", verify_each=False)
    return kv_summary(cached.meta["kv_cache"])["bytes_per_token"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--configs", nargs="*", default=CONFIGS)
    a = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    import kiln
    from kiln.calib import perplexity_and_kl, read_text, windows
    from kiln.models import load_model

    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(lm.folder)
    evalw = windows(tok(read_text("lee_background"))["input_ids"], 256, a.eval_windows)
    train = tok(read_text("lee"))["input_ids"]
    g, _ = kiln.run_pipeline(kiln.trace(lm.model, max_tokens=2048), FRONT, verify_each=False)
    # calibration windows of lee.cor: convert-mla's activation-aware SVD reads them
    g.meta["calib_tokens"] = windows(train, 256, 4)
    ppl0, _, _ = perplexity_and_kl(g, evalw)
    b0 = kv_bytes_per_token(g)
    rows = [("original (GQA, 3 KV heads)", b0, ppl0, None, None)]
    print(f"original: {b0} B/token, ppl {ppl0:.3f}", flush=True)
    for spec in a.configs:
        t0 = time.perf_counter()
        s, _ = kiln.run_pipeline(g, spec, verify_each=False)
        b = kv_bytes_per_token(s)
        ppl, _, _ = perplexity_and_kl(s, evalw)
        print(f"{spec}: {b} B/token, ppl {ppl:.3f} (convert+eval {time.perf_counter() - t0:.0f}s)", flush=True)
        res = kiln.distill(g, s, train, steps=a.steps, seq_len=a.seq_len, batch=a.batch, lr=a.lr, seed=0)
        ppl2, _, _ = perplexity_and_kl(res.student, evalw)
        print(
            f"  after {a.steps} distillation steps ({res.seconds:.0f}s, loss {res.loss_before:.3f} -> "
            f"{res.loss_after:.3f}): ppl {ppl2:.3f}",
            flush=True,
        )
        rows.append((spec, b, ppl, ppl2, res.seconds))
    print(
        f"\nSmolLM2-135M, {len(evalw)} x 256 held-out lee_background tokens; recovery: {a.steps} steps x "
        f"{a.batch} x {a.seq_len} tokens of lee.cor, AdamW lr {a.lr}; MLA factorized on 4 x 256 lee.cor tokens\n"
    )
    print(
        "| attention | KV bytes/token (fp32) | vs original | ppl | ppl after recovery | Δppl after recovery | "
        "recovery time |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, b, ppl, ppl2, sec in rows:
        after = f"{ppl2:.2f}" if ppl2 is not None else "-"
        delta = f"{(ppl2 / ppl0 - 1) * 100:+.1f}%" if ppl2 is not None else "-"
        print(
            f"| `{name}` | {b} | {b / b0:.2f}x | {ppl:.2f} ({(ppl / ppl0 - 1) * 100:+.1f}%) | {after} | {delta} | "
            f"{f'{sec:.0f} s' if sec else '-'} |"
        )


if __name__ == "__main__":
    main()
