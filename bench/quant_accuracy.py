"""Accuracy of kiln's quantization passes on SmolLM2-135M: perplexity and KL to fp32, held-out text.

    .venv/bin/python bench/quant_accuracy.py [--eval-tokens 2048] [--window 256] [--only int8,w8a8]

Calibration: `lee.cor` (8 windows of 256 tokens). Evaluation: the first --eval-tokens tokens of
`lee_background.cor` in --window-token windows: disjoint texts. Every configuration runs the same
IR passes the compiler runs, evaluated with the reference interpreter (the compiled CPU kernels
compute the same values; tests check that).
"""

from __future__ import annotations

import argparse
import sys
import time

BASE = "canonicalize,fuse-norms,fuse-rope,fuse-attention"
CONFIGS = [
    ("fp32", ""),
    ("int8 per-channel (RTN)", "quantize-weights{scheme=int8}"),
    ("int4 g128 RTN", "quantize-weights{scheme=int4_g128}"),
    ("int4 g128 AWQ", "quantize-weights{scheme=int4_g128,method=awq}"),
    ("int4 g128 GPTQ", "quantize-weights{scheme=int4_g128,method=gptq}"),
    ("int4 sym per-channel RTN", "quantize-weights{scheme=int4_sym}"),
    ("int3 g64 RTN", "quantize-weights{scheme=int3_g64}"),
    ("int3 g64 AWQ", "quantize-weights{scheme=int3_g64,method=awq}"),
    ("int3 g64 GPTQ", "quantize-weights{scheme=int3_g64,method=gptq}"),
    ("W8A8 (SmoothQuant a=0.5)", "quantize-activations{alpha=0.5}"),
    ("KV int8", "quantize-kv{dtype=int8}"),
    ("KV fp8 e4m3", "quantize-kv{dtype=fp8_e4m3}"),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--only", default=None, help="comma-separated substrings of configuration names")
    a = ap.parse_args()
    from kiln.calib import perplexity_and_kl, read_text, windows
    from kiln.models import load_model
    from kiln.passmgr import run_pipeline
    from kiln.trace import trace

    lm = load_model("smollm2-135m")
    tok = lm.tokenizer
    calib = windows(tok(read_text("lee"))["input_ids"], 256, a.calib_windows)
    evalw = windows(tok(read_text("lee_background"))["input_ids"], a.window, a.eval_tokens // a.window)
    base, _ = run_pipeline(trace(lm.model), BASE)
    base.meta["calib_tokens"] = calib
    ref = None
    rows = []
    for name, spec in CONFIGS:
        if a.only and name != "fp32" and not any(s.strip().lower() in name.lower() for s in a.only.split(",")):
            continue
        t0 = time.perf_counter()
        g = run_pipeline(base, spec, verify_each=False)[0] if spec else base
        tq = time.perf_counter() - t0
        ppl, kl, logps = perplexity_and_kl(g, evalw, ref)
        if ref is None:
            ref, ppl0 = logps, ppl
        wbytes = g.stats()["param_bytes"]
        rows.append((name, ppl, 100 * (ppl / ppl0 - 1), kl or 0.0, wbytes, tq))
        print(f"  {name}: ppl {ppl:.2f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    print(
        f"\nSmolLM2-135M-Instruct, eval: first {len(evalw) * a.window} tokens of lee_background.cor in "
        f"{a.window}-token windows; calibration: {len(calib)} x 256 tokens of lee.cor\n"
    )
    rtn = {n.split(" RTN")[0]: p for n, p, *_ in rows if n.endswith(" RTN")}
    print(
        "| configuration | perplexity | vs fp32 | gap to fp32 closed vs RTN | mean KL to fp32 (nats/token) "
        "| weight bytes | pass seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, ppl, d, kl, wb, tq in rows:
        base = next((p for k, p in rtn.items() if name.startswith(k) and not name.endswith("RTN")), None)
        closed = f"{100 * (1 - (ppl - ppl0) / (base - ppl0)):.0f}%" if base else "-"
        print(f"| {name} | {ppl:.2f} | {d:+.1f}% | {closed} | {kl:.4f} | {wb / 1e6:.1f} MB | {tq:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
