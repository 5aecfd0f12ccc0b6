"""Speculative decoding on the real model: decode speed with and without speculation, same process, same prompts.

    .venv/bin/python bench/speculative.py [--artifact DIR] [--drafts self:8,distill:6:150] [--max-tokens 64]

Prompts: bench/workloads/speculative.jsonl (chat questions, summarize-this-passage, rewrite-this-code),
rendered with SmolLM2's chat template. The target artifact carries its draft models (`kiln build --draft`;
built here with `--drafts` unless `--artifact` is given). Draft kinds (`--kinds`), each through a `Server`
with one request at a time:
- `ngram`: prompt lookup with a fixed draft length `--k`;
- `adaptive`: prompt lookup, each request's draft length chosen from its acceptance and the measured cost
  of verify steps (0 = plain decoding);
- `self`, `distill`: the artifact's draft model of that kind, with the adaptive k of speculative.py;
- `auto`: per step, prompt lookup or the artifact's draft model or plain decoding, by expected gain
  (runtime/spec_auto.py); the headline figures are this kind's.
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


def target_artifact(model: str, out: str, drafts: str) -> str:
    import kiln

    kw = {"draft": drafts.split(",")} if drafts else {}
    path, _ = kiln.cached_build(model, out, **kw)
    if "verify" not in json.load(open(os.path.join(path, "manifest.json")))["entry_points"]:
        path, _ = kiln.cached_build(model, out + "-v", use_cache=False, **kw)  # stale cache entry without verify
    return path


def dir_bytes(path: str, skip: str = "") -> int:
    return sum(
        os.path.getsize(os.path.join(r, n))
        for r, _, names in os.walk(path)
        if not (skip and os.path.relpath(r, path).startswith(skip))
        for n in names
    )


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
    keys = ("spec_proposed", "spec_accepted", "spec_steps", "spec_plain_steps", "spec_model_proposed")
    stats = {key: m.get(key) for key in keys + ("spec_model_accepted", "spec_model_steps", "spec_draft_cost")}
    stats["tokens"] = out.token_ids
    return secs, len(out.token_ids) - 1, stats


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", default=None, help="target artifact (default: kiln.cached_build)")
    ap.add_argument("--workload", default=os.path.join(HERE, "workloads", "speculative.jsonl"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="draft length of the fixed-k ngram kind")
    ap.add_argument("--k-max", type=int, default=8, help="longest draft the adaptive kind tries")
    ap.add_argument("--drafts", default="self:8,distill:6:150", help="draft models to build into the target")
    ap.add_argument("--kinds", default="adaptive,self,distill,auto", help="draft kinds to run (besides plain)")
    ap.add_argument("--modes", default="greedy,sampled")
    ap.add_argument("--reps", type=int, default=2, help="runs of each prompt and kind; the fastest counts")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    import kiln
    from kiln.runtime.sampling import SamplingParams

    tmp = tempfile.mkdtemp()
    art = a.artifact or target_artifact(a.model, os.path.join(tmp, "target"), a.drafts)
    eng = kiln.load(art, kv_cache_tokens=4096)
    have = eng.manifest.get("drafts") or {}
    every: dict[str, tuple] = {
        "ngram": ("ngram", a.k, a.k, False),
        "adaptive": ("ngram", a.k, a.k_max, True),
        "self": ("self", a.k, a.k_max, True),
        "distill": ("distill", a.k, a.k_max, True),
        "auto": ("auto", a.k, a.k_max, True),
    }
    want = [n for n in a.kinds.split(",") if n]
    unknown = [n for n in want if n not in every]
    if unknown:
        raise SystemExit(f"--kinds: unknown {unknown}; choose from {', '.join(every)}")
    kinds = {n: every[n] for n in want if n in ("ngram", "adaptive") or (have and n == "auto") or n in have}
    print(f"kinds: {', '.join(kinds)} (drafts in the artifact: {', '.join(have) or 'none'})", flush=True)
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
    # acc[mode][kind][class] = [decode seconds, tokens, proposed, accepted, verify steps,
    #                           model-draft proposed, model-draft accepted, model-draft steps]
    present = [c for c in CLASSES if any(cls == c for cls, _ in prompts)]  # a smaller workload may lack some
    acc = {m: {n: {c: [0.0, 0, 0, 0, 0, 0, 0, 0] for c in present} for n in names} for m in a.modes.split(",")}
    draft_cost = None
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
                c[5] += st["spec_model_proposed"] or 0
                c[6] += st["spec_model_accepted"] or 0
                c[7] += st["spec_model_steps"] or 0
                draft_cost = st["spec_draft_cost"] or draft_cost
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
        "target_bytes": dir_bytes(art, skip="drafts"),
        "drafts": {
            k: {
                x: v[x]
                for x in ("spec", "layers", "steps", "head_tokens", "bytes", "shared_weights", "own_weights")
                if x in v
            }
            for k, v in have.items()
        },
        "draft_bytes_added": {k: v.get("bytes") for k, v in have.items()},
        "auto_draft_cost_in_target_decodes": draft_cost,
        "rows": [],
    }
    print(f"\n{a.model}, {len(prompts)} prompts, max_tokens {a.max_tokens}; ratios are decode tok/s vs plain\n")
    print("| mode | kind | class | decode tok/s | vs plain | acceptance | tokens per verify |")
    print("|---|---|---|---|---|---|---|")
    for mode, per in acc.items():
        for n in names:
            for cls in present:
                secs, toks, prop, got, verifies = per[n][cls][:5]
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
                if n == "auto":  # which source the policy used, and how the draft model fared when used
                    mp, ma, ms = per[n][cls][5:8]
                    row["model_draft_steps"] = ms
                    row["prompt_lookup_steps"] = verifies - ms
                    row["model_draft_acceptance"] = round(ma / mp, 3) if mp else None
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
                verifies = sum(per[n][c][4] for c in present)
                figures[f"tokens_per_verify_{n}_{mode}"] = (
                    round((sum(per[n][c][3] for c in present) + verifies) / verifies, 3) if verifies else None
                )
                if n == "auto":
                    mp = sum(per[n][c][5] for c in present)
                    figures[f"acceptance_auto_model_draft_{mode}"] = (
                        round(sum(per[n][c][6] for c in present) / mp, 3) if mp else None
                    )

    def speedup(mode: str, kind: str, cls: str) -> float:
        return next(r["speedup"] for r in figures["rows"] if (r["mode"], r["kind"], r["class"]) == (mode, kind, cls))

    head = "greedy" if "greedy" in acc else next(iter(acc))
    lead = "auto" if "auto" in kinds else "adaptive"
    for mode in acc:
        sfx = "" if mode == head else f"_{mode}"
        for cls in present:
            figures[f"{cls}_speedup_cpu{sfx}"] = speedup(mode, lead, cls)
        figures[f"min_class_speedup_cpu{sfx}"] = min(speedup(mode, lead, c) for c in present)
        for n in kinds:
            figures[f"min_class_speedup_cpu_{n}_{mode}"] = min(speedup(mode, n, c) for c in present)
    figures["headline"] = (
        f"{'auto (prompt lookup or draft model, per step)' if lead == 'auto' else 'adaptive prompt lookup'}, {head}"
    )
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
