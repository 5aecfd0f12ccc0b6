"""`kiln tune` on the real model: mixed precision per projection against single-scheme builds.

    .venv/bin/python bench/tune.py [--model smollm2-135m] [--max-trials 8] [--eval-tokens 1024]

Two searches: budget ppl+1% with objective size, then ppl+5% with objective speed (the second reads the
first's cached sensitivity analysis). Calibration: `lee.cor` (2 windows of 256 tokens); evaluation: the
first --eval-tokens tokens of `lee_background.cor` in 256-token windows, for every candidate and every
single-scheme build alike. Single-scheme builds: int8, int4 g32, int4 g128 (RTN); their held-out
perplexity comes from the same evaluation. Decode speed (batch 1, greedy) is measured on built artifacts
in this process, the builds taking turns (--rounds rounds, best round counts) so load from other
processes on a shared host hits them alike: read the ratios, not the absolute tokens per second.

Goals (issue #22): size <= 0.6x the int8 build at +1% perplexity; decode >= 1.3x the best single-scheme
build within +5%; each search under 15 minutes. Figures go to bench/results/tune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SINGLES = ("int8", "int4_g32", "int4_g128")


def weight_bytes(path: str) -> int:
    with open(os.path.join(path, "manifest.json")) as f:
        return int(json.load(f)["weight_bytes"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-trials", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3, help="decode measurements per build (best counts)")
    ap.add_argument("--steps", type=int, default=48, help="decode steps per measurement")
    ap.add_argument("--out", default=None, help="folder for the builds (default: a temporary one)")
    a = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("kiln.quant", "kiln.passes", "kiln.calib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from results_io import write_results

    import kiln
    from kiln.models import load_model
    from kiln.tuning import decode_tok_s

    root = a.out or tempfile.mkdtemp(prefix="kiln-tune-")
    lm = load_model(a.model)
    common = dict(
        target="cpu",
        max_trials=a.max_trials,
        eval_tokens=a.eval_tokens,
        tokenizer_dir=lm.folder,
        references=SINGLES,
    )
    t = time.perf_counter()
    size = kiln.tune(lm.model, budget="ppl+1%", objective="size", out=os.path.join(root, "size"), **common)
    size_min = (time.perf_counter() - t) / 60
    t = time.perf_counter()
    speed = kiln.tune(
        lm.model,
        budget="ppl+5%",
        objective="speed",
        out=os.path.join(root, "speed"),
        **{**common, "references": ()},
    )
    speed_min = (time.perf_counter() - t) / 60
    refs = {r.name: r for r in size.references}
    ppl0 = size.ppl_fp32
    builds = {"tuned size (ppl+1%)": size.artifact, "tuned speed (ppl+5%)": speed.artifact}
    within5 = [s for s in SINGLES if refs[s].ppl is not None and refs[s].ppl <= ppl0 * 1.05]
    for s in SINGLES:
        if s == "int8" or s in within5:
            builds[s], _ = kiln.cached_build(a.model, os.path.join(root, s), quant=s)
    speeds: dict[str, float] = {k: 0.0 for k in builds}
    for _ in range(a.rounds):
        for k, p in builds.items():
            speeds[k] = max(speeds[k], decode_tok_s(p, a.steps))
    rows = []
    ppl = {
        "tuned size (ppl+1%)": size.chosen.ppl,
        "tuned speed (ppl+5%)": speed.chosen.ppl,
        **{s: refs[s].ppl for s in SINGLES},
    }
    for k in list(builds) + [s for s in SINGLES if s not in builds]:
        p = builds.get(k)
        wb = weight_bytes(p) if p else refs[k].weight_bytes
        rows.append(
            {
                "build": k,
                "weight_mb": round(wb / 1e6, 2),
                "ppl": round(float(ppl[k] or 0), 3),
                "ppl_vs_fp32_pct": round(100 * (float(ppl[k] or 0) / ppl0 - 1), 2),
                "decode_tok_s": round(speeds[k], 1) if k in speeds else None,
            }
        )
    best_single = max(within5, key=lambda s: speeds[s]) if within5 else "int8"
    size_ratio = weight_bytes(builds["tuned size (ppl+1%)"]) / weight_bytes(builds["int8"])
    speed_ratio = speeds["tuned speed (ppl+5%)"] / speeds[best_single]
    print(f"\n{a.model}; held-out: first {a.eval_tokens} tokens of lee_background.cor; fp32 perplexity {ppl0:.3f}\n")
    print("| build | weight MB | perplexity | vs fp32 | decode tok/s (batch 1) |")
    print("|---|---|---|---|---|")
    for r in rows:
        dec = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        print(f"| {r['build']} | {r['weight_mb']:.1f} | {r['ppl']:.3f} | {r['ppl_vs_fp32_pct']:+.2f}% | {dec} |")
    print(f"\nsize vs int8 at +1%: {size_ratio:.3f}x (goal <= 0.6x)")
    print(f"decode vs best single-scheme build within +5% ({best_single}): {speed_ratio:.3f}x (goal >= 1.3x)")
    print(f"search minutes: size {size_min:.1f}, speed {speed_min:.1f} (goal < 15)")
    write_results(
        "tune",
        {
            "model": a.model,
            "eval": f"first {a.eval_tokens} tokens of lee_background.cor, 256-token windows",
            "calib": "lee.cor, 2 windows of 256 tokens",
            "ppl_fp32": round(ppl0, 4),
            "size_vs_int8_at_1pct": round(size_ratio, 3),
            "speed_vs_best_single_at_5pct": round(speed_ratio, 3),
            "best_single_at_5pct": best_single,
            "search_minutes": round(max(size_min, speed_min), 2),
            "search_minutes_each": {"size_ppl+1%": round(size_min, 2), "speed_ppl+5%": round(speed_min, 2)},
            "seconds": {"size": size.seconds, "speed": speed.seconds},
            "chosen_schemes": {
                "size_ppl+1%": size.chosen.summary()["schemes"],
                "speed_ppl+5%": speed.chosen.summary()["schemes"],
            },
            "candidates_evaluated": {"size_ppl+1%": len(size.candidates), "speed_ppl+5%": len(speed.candidates)},
            "rows": rows,
            "note": "shared, loaded 2-core host: read the ratios, not absolute speeds",
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
