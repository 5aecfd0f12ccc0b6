"""Speculative decoding on the real model: decode speed with and without speculation, same process, same prompts.

    .venv/bin/python bench/speculative.py [--artifact DIR] [--max-tokens 128] [--draft-layers 0]

Prompts: bench/workloads/speculative.jsonl (chat questions, summarize-this-passage, rewrite-this-code),
rendered with SmolLM2's chat template. Draft kinds, each through a `Server` with one request at a time:
- `ngram`: prompt lookup with a fixed draft length `--k`;
- `adaptive`: prompt lookup, each request's draft length chosen from its acceptance and the measured cost
  of verify steps (0 = plain decoding);
- `draft`: with `--draft-layers N`, SmolLM2 cut to its first N layers (built by kiln) as a draft model.
Each prompt runs plain decoding and every kind back to back (the order rotates from prompt to prompt), so
load from other processes on a shared machine hits them alike; ratios are decode-phase tokens per second
against plain decoding over each class. Greedy outputs are asserted identical to plain decoding; sampled
runs (temperature 0.7, seeded) have the same distribution, not the same tokens. Each prompt and kind runs
`--reps` times and the fastest run counts. Figures go to
bench/results/speculative.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ("chat", "summarize", "rewrite")
GOALS = {"summarize": 1.8, "rewrite": 1.8, "chat": 1.3}
FLOOR = 0.95


def build_draft(model: str, layers: int, out: str) -> str:
    import kiln
    from kiln.models import load_model

    lm = load_model(model)
    m = lm.model
    m.model.layers = m.model.layers[:layers]
    m.config.num_hidden_layers = layers
    if hasattr(m.config, "layer_types") and m.config.layer_types:
        m.config.layer_types = m.config.layer_types[:layers]
    return kiln.compile(m, target="cpu", passes="O1", tokenizer_dir=lm.folder, name=f"{model}-draft{layers}").save(out)


def target_artifact(model: str, out: str) -> str:
    import kiln

    path, _ = kiln.cached_build(model, out)
    if "verify" not in json.load(open(os.path.join(path, "manifest.json")))["entry_points"]:
        path, _ = kiln.cached_build(model, out + "-v", use_cache=False)  # stale cache entry without verify
    return path


def load_workload(path: str) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    bad = [r.get("id") for r in rows if r.get("class") not in CLASSES or not r.get("prompt")]
    if bad:
        raise SystemExit(f"{path}: rows {bad} need a class in {CLASSES} and a prompt")
    return rows


def run_one(eng, ids: list[int], sp, draft, k: int, k_max: int, adaptive: bool) -> tuple[float, int, dict]:
    """Decode-phase seconds, tokens after the first, and the speculator's stats for one request."""
    from kiln.runtime.serving import Server

    srv = Server(
        eng,
        max_batch=1,
        background=False,
        prefix_caching=False,
        draft=draft,
        spec_k=k,
        spec_k_max=k_max,
        spec_adaptive=adaptive,
    )
    try:
        t = time.perf_counter()
        out = srv.generate([ids], sp)[0]
        secs = time.perf_counter() - t - out.prefill_seconds
        m = srv.metrics()
    finally:
        srv.close()
    stats = {key: m.get(key) for key in ("spec_proposed", "spec_accepted", "spec_steps", "spec_plain_steps")}
    stats["tokens"] = out.token_ids
    return secs, len(out.token_ids) - 1, stats


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", default=None, help="target artifact (default: kiln.cached_build)")
    ap.add_argument("--workload", default=os.path.join(HERE, "workloads", "speculative.jsonl"))
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="draft length of the fixed-k ngram kind")
    ap.add_argument("--k-max", type=int, default=8, help="longest draft the adaptive kind tries")
    ap.add_argument("--draft-layers", type=int, default=0, help="also a draft model of the first N layers")
    ap.add_argument("--draft-artifact", default=None, help="reuse a built draft")
    ap.add_argument("--modes", default="greedy,sampled")
    ap.add_argument("--reps", type=int, default=2, help="runs of each prompt and kind; the fastest counts")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    import kiln
    from kiln.runtime.sampling import SamplingParams

    tmp = tempfile.mkdtemp()
    art = a.artifact or target_artifact(a.model, os.path.join(tmp, "target"))
    eng = kiln.load(art, kv_cache_tokens=4096)
    kinds: dict[str, tuple] = {"ngram": ("ngram", a.k, a.k, False), "adaptive": ("ngram", a.k, a.k_max, True)}
    if a.draft_layers or a.draft_artifact:
        dart = a.draft_artifact
        if dart is None or not os.path.exists(os.path.join(dart, "manifest.json")):
            dart = build_draft(a.model, a.draft_layers, dart or os.path.join(tmp, "draft"))
        kinds["draft"] = (kiln.load(dart, kv_cache_tokens=4096), a.k, a.k_max, True)
    rows = load_workload(a.workload)
    prompts = [(r["class"], eng.encode(r["prompt"], chat=True)) for r in rows]
    params = {
        "greedy": SamplingParams(max_tokens=a.max_tokens),
        "sampled": SamplingParams(max_tokens=a.max_tokens, temperature=0.7, seed=0),
    }
    t0 = time.perf_counter()
    run_one(eng, prompts[0][1], SamplingParams(max_tokens=4), "ngram", a.k, a.k_max, True)  # warm up, measure costs
    print(f"warm-up and verify-cost measurement: {time.perf_counter() - t0:.1f} s", flush=True)
    names = ["plain"] + list(kinds)
    # acc[mode][kind][class] = [decode seconds, tokens, proposed, accepted, verify steps]
    present = [c for c in CLASSES if any(cls == c for cls, _ in prompts)]  # a smaller workload may lack some
    acc = {m: {n: {c: [0.0, 0, 0, 0, 0] for c in present} for n in names} for m in a.modes.split(",")}
    for mode in acc:
        sp = params[mode]
        for i, (cls, ids) in enumerate(prompts):
            order = names[i % len(names) :] + names[: i % len(names)]
            outs, best = {}, {}
            for _ in range(a.reps):  # the fastest of the repetitions: load from other processes only slows
                for n in order:
                    draft, k, k_max, adaptive = (None, 1, 1, False) if n == "plain" else kinds[n]
                    secs, toks, st = run_one(eng, ids, sp, draft, k, k_max, adaptive)
                    if n not in best or secs < best[n][0]:
                        best[n] = (secs, toks, st)
            for n, (secs, toks, st) in best.items():
                c = acc[mode][n][cls]
                c[0] += secs
                c[1] += toks
                c[2] += st["spec_proposed"] or 0
                c[3] += st["spec_accepted"] or 0
                c[4] += st["spec_steps"] or 0
                outs[n] = st["tokens"]
            if mode == "greedy":
                for n in kinds:
                    assert outs[n] == outs["plain"], f"{rows[i]['id']}: {n} changed the greedy output"
            print(f"{mode} {rows[i]['id']}: {len(outs['plain'])} tokens", flush=True)
    figures: dict = {
        "model": a.model,
        "workload": os.path.relpath(a.workload, os.path.dirname(HERE)),
        "max_tokens": a.max_tokens,
        "k_fixed": a.k,
        "k_max_adaptive": a.k_max,
        "tvm_threads": os.environ.get("TVM_NUM_THREADS"),
        "reps": a.reps,
        "greedy_outputs_identical": "greedy" in acc,
        "rows": [],
    }
    print(f"\n{a.model}, {len(prompts)} prompts, max_tokens {a.max_tokens}; ratios are decode tok/s vs plain\n")
    print("| mode | kind | class | decode tok/s | vs plain | acceptance | tokens per verify |")
    print("|---|---|---|---|---|---|---|")
    for mode, per in acc.items():
        for n in names:
            for cls in present:
                secs, toks, prop, got, verifies = per[n][cls]
                base = per["plain"][cls][1] / per["plain"][cls][0]
                tps = toks / secs
                row = {
                    "mode": mode,
                    "kind": n,
                    "class": cls,
                    "decode_tok_s": round(tps, 2),
                    "speedup": round(tps / base, 3),
                    "acceptance": round(got / prop, 3) if prop else None,
                    "tokens_per_verify": round((got + verifies) / verifies, 3) if verifies else None,
                }
                figures["rows"].append(row)
                print(
                    f"| {mode} | {n} | {cls} | {tps:.1f} | {tps / base:.2f}x | "
                    f"{'-' if row['acceptance'] is None else row['acceptance']} | "
                    f"{'-' if row['tokens_per_verify'] is None else row['tokens_per_verify']} |"
                )
            if n != "plain":
                prop = sum(per[n][c][2] for c in present)
                figures[f"acceptance_{n}_{mode}"] = (
                    round(sum(per[n][c][3] for c in present) / prop, 3) if prop else None
                )

    def speedup(mode: str, kind: str, cls: str) -> float:
        return next(r["speedup"] for r in figures["rows"] if (r["mode"], r["kind"], r["class"]) == (mode, kind, cls))

    head = "greedy" if "greedy" in acc else next(iter(acc))
    for mode in acc:
        sfx = "" if mode == head else f"_{mode}"
        for cls in present:
            figures[f"{cls}_speedup_cpu{sfx}"] = speedup(mode, "adaptive", cls)
        figures[f"min_class_speedup_cpu{sfx}"] = min(speedup(mode, "adaptive", c) for c in present)
        for n in kinds:
            figures[f"min_class_speedup_cpu_{n}_{mode}"] = min(speedup(mode, n, c) for c in present)
    figures["headline"] = f"adaptive prompt lookup, {head}"
    met = {cls: figures[f"{cls}_speedup_cpu"] >= g for cls, g in GOALS.items() if cls in present}
    met["floor"] = figures["min_class_speedup_cpu"] >= FLOOR
    figures["goals"] = {"summarize": ">= 1.8x", "rewrite": ">= 1.8x", "chat": ">= 1.3x", "floor": ">= 0.95x"}
    figures["goals_met"] = met
    print(f"\ngoals ({figures['headline']}): " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    if not a.no_save:
        sys.path.insert(0, HERE)
        from results_io import write_results

        write_results("speculative", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
