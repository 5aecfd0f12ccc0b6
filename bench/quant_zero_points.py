"""Integer against float zero points (`_floatzero`) for RTN weight quantization on SmolLM2-135M.

    .venv/bin/python bench/quant_zero_points.py [--eval-tokens 2048] [--window 256] [--only int4_g128]

Each row quantizes the same weights twice, with a scheme and its `_floatzero` twin, and reports
perplexity and KL to fp32 (reference interpreter) and the mean weight SQNR of the linear weights.
`--weights head` quantizes only the LM head (with its tied table), `body` all but it: SmolLM2's
projections were stored as Q4_1 and its LM head as Q8_0, so the two halves answer differently.
Evaluation: the first --eval-tokens tokens of `lee_background.cor`. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import sys

SCHEMES = ["int4_g32", "int4_g64", "int4_g128", "int8_asym"]


def sqnr_db(ref, x) -> float:
    return 10 * math.log10(float((ref**2).sum() / ((ref - x) ** 2).sum().clamp_min(1e-30)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--only", default=None, help="comma-separated schemes (default: all of " + ",".join(SCHEMES) + ")")
    ap.add_argument("--weights", choices=("all", "head", "body"), default="all")
    a = ap.parse_args()
    from kiln.calib import perplexity_and_kl, read_text, windows
    from kiln.models import load_model
    from kiln.passes import REGISTRY, run_counted
    from kiln.passes.qweights import is_lm_head
    from kiln.passmgr import run_pipeline
    from kiln.quant import dequantize, parse_scheme, rtn
    from kiln.trace import trace

    lm = load_model("smollm2-135m")
    evalw = windows(lm.tokenizer(read_text("lee_background"))["input_ids"], a.window, a.eval_tokens // a.window)
    base, _ = run_pipeline(trace(lm.model), "canonicalize,fuse-norms,fuse-rope,fuse-attention")
    ppl0, _, ref = perplexity_and_kl(base, evalw, None)
    linears = [n for n in base.find("linear") if n.inputs[1].op == "param"]
    skip = {
        n.inputs[1].attrs["name"]
        for n in linears
        if (a.weights == "head" and not is_lm_head(base, n)) or (a.weights == "body" and is_lm_head(base, n))
    }
    rows = []
    for name in a.only.split(",") if a.only else SCHEMES:
        for scheme in (name, name + "_floatzero"):
            sch = parse_scheme(scheme)
            plan = {w: "none" for w in sorted(skip)}
            g, _ = run_counted(REGISTRY["quantize-weights"], base, {"scheme": scheme, "plan": plan})
            ppl, kl, _ = perplexity_and_kl(g, evalw, ref)
            sq = []
            for n in linears:
                w = base.params[n.inputs[1].attrs["name"]].float()
                if n.inputs[1].attrs["name"] not in skip:
                    sq.append(sqnr_db(w, dequantize(*rtn(w, sch), sch.group_for(w.shape[1]))))
            rows.append((scheme, ppl, kl or 0.0, sum(sq) / len(sq)))
            print(f"  {scheme}: ppl {ppl:.2f}", file=sys.stderr, flush=True)
    print(
        f"\nSmolLM2-135M-Instruct, weights: {a.weights}; eval: first {len(evalw) * a.window} tokens of "
        f"lee_background.cor in {a.window}-token windows; fp32 perplexity {ppl0:.2f}\n"
    )
    print("| scheme | perplexity | vs fp32 | mean KL to fp32 (nats/token) | mean weight SQNR (dB) |")
    print("|---|---|---|---|---|")
    for scheme, ppl, kl, sq in rows:
        print(f"| {scheme} | {ppl:.2f} | {100 * (ppl / ppl0 - 1):+.1f}% | {kl:.4f} | {sq:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
