"""Accuracy and size of kiln's pruning and sparsity passes on SmolLM2-135M, before and after a small
distillation recovery.

    .venv/bin/python bench/prune_accuracy.py [--only "20%,wanda"] [--steps 24] [--batch 2] [--seq-len 128]
                                            [--eval-tokens 2048] [--no-recovery] [--json out/prune.json]

Calibration (importance statistics) and distillation text: `lee.cor`. Evaluation: the first --eval-tokens
tokens of `lee_background.cor` in 256-token windows, a disjoint text. Every configuration runs the
passes the compiler runs on the full-sequence IR, evaluated with the reference interpreter; recovery is
`kiln.distill` with the unpruned model as teacher, the same fixed budget for every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

BASE = "canonicalize,fuse-norms,fuse-rope,fuse-attention"
CONFIGS = [
    ("dense", ""),
    ("structured 20% (heads + FFN)", "prune-heads{ratio=0.2},prune-ffn{ratio=0.2}"),
    ("structured 40% (heads + FFN)", "prune-heads{ratio=0.4},prune-ffn{ratio=0.4}"),
    ("2 layers removed", "prune-layers{n=2}"),
    ("4 layers removed", "prune-layers{n=4}"),
    ("50% unstructured, magnitude", "sparsify{ratio=0.5,method=magnitude}"),
    ("50% unstructured, wanda", "sparsify{ratio=0.5,method=wanda}"),
    ("2:4, magnitude", "sparsify{pattern=2:4,method=magnitude}"),
    ("2:4, wanda", "sparsify{pattern=2:4,method=wanda}"),
]


def stored_bytes(g) -> int:
    """Weight bytes as the artifact stores them: sparse weights compactly (kiln.runtime.sparse)."""
    sparse = g.meta.get("sparsity", {}).get("params", {})
    total = 0
    for name, t in g.params.items():
        dense = int(t.numel()) * t.element_size()
        if name in sparse:
            nnz = int((t != 0).sum())
            total += nnz * 4 + int(t.numel()) // 8  # values + a bitmask, or 2:4 values + 4 bits per group
        else:
            total += dense
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated substrings of configuration names")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--no-recovery", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch

    torch.manual_seed(0)
    import kiln
    from kiln.calib import perplexity_and_kl, read_text, windows
    from kiln.models import load_model
    from kiln.passmgr import flops_per_token, run_pipeline
    from kiln.trace import trace

    lm = load_model("smollm2-135m")
    tok = lm.tokenizer
    train_ids = tok(read_text("lee"))["input_ids"]
    calib = windows(train_ids, 256, a.calib_windows)
    evalw = windows(tok(read_text("lee_background"))["input_ids"], 256, a.eval_tokens // 256)
    base, _ = run_pipeline(trace(lm.model), BASE)
    base.meta["calib_tokens"] = calib
    rows = []
    ppl0 = None
    print(
        f"eval: {sum(map(len, evalw))} tokens of lee_background; calibration/distillation: lee.cor; recovery: "
        f"{a.steps} steps x {a.batch} x {a.seq_len} tokens, lr {a.lr}, T {a.temperature}",
        flush=True,
    )
    for name, spec in CONFIGS:
        if a.only and name != "dense" and not any(s.strip().lower() in name.lower() for s in a.only.split(",")):
            continue
        t0 = time.perf_counter()
        g = run_pipeline(base, spec, verify_each=False)[0] if spec else base
        tp = time.perf_counter() - t0
        ppl, _, _ = perplexity_and_kl(g, evalw)
        st = g.stats()
        row = {
            "config": name,
            "passes": spec,
            "params": st["params"],
            "param_bytes": st["param_bytes"],
            "stored_bytes": stored_bytes(g),
            "flops_per_token": flops_per_token(g),
            "ppl": ppl,
            "prune_seconds": round(tp, 1),
            "shapes": g.meta.get("prune"),
        }
        if ppl0 is None:
            ppl0 = ppl
        elif not a.no_recovery:
            r = kiln.distill(
                base,
                g,
                train_ids,
                steps=a.steps,
                seq_len=a.seq_len,
                batch=a.batch,
                lr=a.lr,
                temperature=a.temperature,
                seed=0,
            )
            row.update(
                ppl_recovered=perplexity_and_kl(r.student, evalw)[0],
                distill_seconds=r.seconds,
                distill_loss=[r.loss_before, r.loss_after],
            )
        rows.append(row)
        rec = (
            f" -> {row['ppl_recovered']:.2f} after recovery ({row['distill_seconds']:.0f} s)"
            if "ppl_recovered" in row
            else ""
        )
        print(
            f"{name:32s} params {st['params'] / 1e6:7.2f} M  stored {row['stored_bytes'] / 1e6:7.1f} MB  "
            f"GFLOP/token {row['flops_per_token'] / 1e9:.3f}  ppl {ppl:8.2f}{rec}",
            flush=True,
        )
    print()
    print(
        "| configuration | params | weight bytes (stored) | FLOPs/token | perplexity | vs dense | after recovery"
        " | vs dense | increase recovered |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = (r["ppl"] / ppl0 - 1) * 100
        rec = r.get("ppl_recovered")
        cells = [
            r["config"],
            f"{r['params'] / 1e6:.1f} M",
            f"{r['stored_bytes'] / 1e6:.1f} MB",
            f"{r['flops_per_token'] / 1e6:.1f} M",
            f"{r['ppl']:.2f}",
            f"{d:+.1f}%" if r is not rows[0] else "",
        ]
        if rec is not None:
            cells += [
                f"{rec:.2f}",
                f"{(rec / ppl0 - 1) * 100:+.1f}%",
                f"{(r['ppl'] - rec) / max(r['ppl'] - ppl0, 1e-9) * 100:.0f}%",
            ]
        else:
            cells += ["", "", ""]
        print("| " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "args": vars(a)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
