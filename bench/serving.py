"""Serving benchmark: static vs dynamic vs continuous batching through `Server`, chat-like traffic, one process.

CPU, the real model (SmolLM2-135M, built with the CLI's defaults unless --artifact is given); prompts are
slices of the Lee corpus:

    .venv/bin/python bench/serving.py --requests 48 --rates 1.5 --repeats 3 --prefix --prefix-tokens 256 \\
        --prefix-rate 0.5 --prefix-requests 12 --save cpu_serving

(about 21 minutes on 2 loaded cores: bench/results/cpu_serving.json).

GPU host (TVM's runtime, torch and transformers only): an artifact built without weights by
`python bench/gpu_decode.py build DIR --models llama-3.1-8b --variants fp16`, seeded random weights made there
exactly as bench/gpu_decode.py makes them (`seeded_model`), prompts of random token ids:

    python bench/serving.py --artifact DIR/llama-3.1-8b-fp16 --random-weights llama-3.1-8b \\
        --max-batch 64 --kv-cache-tokens 131072 --requests 128 --prompt-median 128 --prompt-max 2048 \\
        --output-median 64 --output-max 512 --rates 2,4,8,16,24,32 --ttft-limit 3 \\
        --policies static,continuous --repeats 1 --prefix --prefix-tokens 640 --prefix-rate 8 \\
        --save gpu_serving --json gpu_serving_run.json

(about 5 minutes on an H200 at ~15 ms a decode step at batch 64; `--repeats 3` takes three times as long).
`--fixed-batches 1,8,32,64,128,256` adds decode tok/s at those fixed batch sizes at `--fixed-context` (512)
tokens, each beside its floor (bench/fixed_batch.py), and batch 64 again with the tokens drawn on the host;
`--fixed-only` runs only those.

The workload (bench/serving_workload.py): `--requests` requests with log-normal prompt lengths (median
`--prompt-median`, sigma 1.0: a long tail, clipped to `--prompt-max`) and short chat outputs (median
`--output-median`, sigma 0.7, clipped to `--output-max`), Poisson arrivals. It is drawn once from `--seed`;
every policy, rate and repeat replays the same requests, a rate only rescales the arrival gaps. Outputs run to
their length (ignore_eos), so every policy does the same work.

For each rate in `--rates` and each policy: throughput, TTFT mean/p50/p99, TPOT, peak KV pages. `--repeats N`
runs the whole sweep N times (policies interleaved) and reports the median of each figure. With
`--ttft-limit S`, a policy's *sustainable rate* is where its p99 TTFT crosses S, interpolated linearly between
the highest passing swept rate and the next one (the highest passing rate is reported too); once a policy's
p99 TTFT passes 3x the limit, its higher rates are skipped in that repeat (they cannot pass).
`--prefix`: a second workload whose prompts start with one shared system prompt of `--prefix-tokens` tokens,
served by the continuous policy with prefix caching on and off at `--prefix-rate`: hit rate and TTFT of both.
`--save NAME` writes bench/results/NAME.json (machine, date, commit: bench/results_io.py); `--json PATH` writes
the same figures anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
from serving_models import load_engine
from serving_workload import Shape, Workload, make_workload, median_of, replay, sustainable_rate, warm_up

SKIP_FACTOR = 3.0  # a policy whose p99 TTFT is past this many limits is not run at higher rates (it cannot pass)


# -- runs -------------------------------------------------------------------------------------------


def sweep(eng, wl, a: argparse.Namespace, policies: list[str], rates: list[float]) -> dict:
    """Every (repeat, rate, policy) run; returns {policy: {rate: [metrics of each repeat that ran]}}."""
    runs: dict = {p: {r: [] for r in rates} for p in policies}
    for rep in range(a.repeats):
        over: set[str] = set()
        for rate in sorted(rates):
            for pol in policies:
                if pol in over:
                    continue
                t = time.perf_counter()
                m = replay(eng, pol, wl.at(rate), a.max_batch, a.prefill_chunk, a.max_wait)
                runs[pol][rate].append(m)
                print(
                    f"  repeat {rep + 1}/{a.repeats} rate {rate:g}/s {pol:>10}: {m['tokens_per_s']:.1f} tok/s, "
                    f"TTFT p99 {m['ttft_p99_s']:.2f} s ({time.perf_counter() - t:.1f} s)",
                    flush=True,
                )
                if a.ttft_limit and m["ttft_p99_s"] > SKIP_FACTOR * a.ttft_limit:
                    over.add(pol)
                if a.json:  # after every run, so a run cut short keeps what it measured
                    done = {
                        p: {f"{r:g}": median_of(ms)["runs"] for r, ms in by.items() if ms} for p, by in runs.items()
                    }
                    with open(a.json, "w") as f:
                        json.dump({"partial": True, "runs": done}, f, indent=1)
    return runs


def summarize(runs: dict, a: argparse.Namespace, rates: list[float]) -> dict:
    """Medians per policy and rate, sustainable rates, and the continuous / static ratios."""
    out: dict = {"policies": {}}
    for pol, by_rate in runs.items():
        per = {}
        p99s: list[float | None] = []
        for r in rates:
            ms = by_rate[r]
            per[f"{r:g}"] = median_of(ms) if ms else None
            # a skipped repeat counts as over the limit: the median p99 TTFT over every repeat
            vals = sorted([m["ttft_p99_s"] for m in ms] + [float("inf")] * (a.repeats - len(ms)))
            med = float(np.median(vals))
            p99s.append(med if np.isfinite(med) else None)
        entry: dict = {"per_rate": per}
        if a.ttft_limit:
            s = sustainable_rate(rates, p99s, a.ttft_limit)
            entry.update(sustainable_rate=s["interpolated"], highest_passing_rate=s["highest_passing"])
            entry["saturated_in_sweep"] = s["saturated_in_sweep"]
        out["policies"][pol] = entry
    if "static" in runs and "continuous" in runs:
        both = [r for r in rates if runs["static"][r] and runs["continuous"][r]]
        if both:  # at the highest rate both ran: the most loaded, where throughput is capacity
            r = max(both)
            s, c = (out["policies"][p]["per_rate"][f"{r:g}"] for p in ("static", "continuous"))
            out["ratio_rate"] = r
            out["continuous_over_static_throughput"] = c["tokens_per_s"] / s["tokens_per_s"]
            out["continuous_over_static_p99_ttft"] = c["ttft_p99_s"] / s["ttft_p99_s"]
            out["continuous_over_static_mean_ttft"] = c["ttft_mean_s"] / s["ttft_mean_s"]
        if a.ttft_limit:
            s_rate = out["policies"]["static"]["sustainable_rate"]
            c_rate = out["policies"]["continuous"]["sustainable_rate"]
            out["continuous_over_static_rate"] = c_rate / s_rate if s_rate > 0 else None
            s_pass, c_pass = (out["policies"][p]["highest_passing_rate"] for p in ("static", "continuous"))
            out["continuous_over_static_highest_passing_rate"] = c_pass / s_pass if s_pass > 0 else None
    first = {p: [runs[p][r][0]["outputs"] for r in rates if runs[p][r]] for p in runs}
    names = list(first)
    n = min(len(v) for v in first.values())
    out["greedy_outputs_identical"] = all(first[p][:n] == first[names[0]][:n] for p in names)
    return out


def prefix_workload(tokens, a: argparse.Namespace) -> Workload:
    """Prompts that start with one shared system prompt of --prefix-tokens, then a user part of the usual spread."""
    shape = Shape(
        a.prefix_requests or a.requests,
        a.prompt_median,
        a.prompt_max,
        a.output_median,
        a.output_max,
        a.prefix_tokens,
        a.seed + 1,
    )
    return make_workload(shape, tokens)


def check_fits(wl: Workload, eng, what: str) -> None:
    """Refuse, before any run, a workload whose longest request the artifact cannot serve."""
    longest = max(len(p) + o for p, o in zip(wl.prompts, wl.outputs))
    if longest > eng.max_context:
        sys.exit(
            f"the {what} workload's longest request needs {longest} positions, the artifact serves "
            f"{eng.max_context}: lower --prompt-max / --output-max" + (" / --prefix-tokens" if what == "prefix" else "")
        )


def prefix_runs(eng, wl: Workload, a: argparse.Namespace) -> dict:
    """The shared-system-prompt workload under continuous batching, prefix caching on and off."""
    shape = wl.shape
    reqs = wl.at(a.prefix_rate)
    res: dict = {"rate": a.prefix_rate, "workload": {**shape.__dict__, **wl.stats}}
    runs: dict = {True: [], False: []}
    for rep in range(a.repeats):
        for cached in (True, False):
            m = replay(eng, "continuous", reqs, a.max_batch, a.prefill_chunk, a.max_wait, prefix_caching=cached)
            runs[cached].append(m)
            print(
                f"  prefix repeat {rep + 1}/{a.repeats} caching {'on ' if cached else 'off'}: hit rate "
                f"{m['prefix_hit_rate']:.2f}, TTFT mean {m['ttft_mean_s']:.3f} s p99 {m['ttft_p99_s']:.3f} s",
                flush=True,
            )
    on, off = median_of(runs[True]), median_of(runs[False])
    res.update(cached=on, uncached=off, hit_rate=on["prefix_hit_rate"], hit_rate_uncached=off["prefix_hit_rate"])
    for k in ("ttft_mean_s", "ttft_p99_s"):
        res[f"{k}_cached"], res[f"{k}_uncached"] = on[k], off[k]
        res[f"{k.removesuffix('_s')}_gain"] = off[k] / on[k]
    return res


# -- report -----------------------------------------------------------------------------------------


def print_table(summary: dict, rates: list[float]) -> None:
    print(
        "\n| rate (req/s) | policy | output tok/s | TTFT mean / p99 (s) | TPOT mean / p99 (ms) | peak KV pages "
        "| preemptions | prefix-hit tokens |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rates:
        for pol, entry in summary["policies"].items():
            m = entry["per_rate"][f"{r:g}"]
            if m is None:
                print(f"| {r:g} | {pol} | skipped: p99 TTFT past {SKIP_FACTOR:g}x the limit at a lower rate |||||")
                continue
            print(
                f"| {r:g} | {pol} | {m['tokens_per_s']:.1f} | {m['ttft_mean_s']:.2f} / {m['ttft_p99_s']:.2f} | "
                f"{1e3 * m['tpot_mean_s']:.1f} / {1e3 * m['tpot_p99_s']:.1f} | {m['pages_peak_used']:.0f} | "
                f"{m['preemptions']:.0f} | {m['prefix_hit_tokens']:.0f} |"
            )
    for pol, entry in summary["policies"].items():
        if "sustainable_rate" in entry:
            print(
                f"{pol}: sustainable rate {entry['sustainable_rate']:.2f} req/s (interpolated; highest passing "
                f"swept rate {entry['highest_passing_rate']:g})"
                + ("" if entry["saturated_in_sweep"] else ", not saturated by the sweep: a lower bound")
            )
    if "continuous_over_static_throughput" in summary:
        print(
            f"\ncontinuous / static at {summary['ratio_rate']:g} req/s: throughput "
            f"{summary['continuous_over_static_throughput']:.2f}x, p99 TTFT "
            f"{summary['continuous_over_static_p99_ttft']:.2f}x, mean TTFT "
            f"{summary['continuous_over_static_mean_ttft']:.2f}x"
        )
    if summary.get("continuous_over_static_rate") is not None:
        print(f"continuous / static sustainable rate: {summary['continuous_over_static_rate']:.2f}x")
    print(f"greedy outputs identical across policies: {summary['greedy_outputs_identical']}")


def fixed_batches(eng, a: argparse.Namespace) -> dict:
    """Decode tok/s at fixed batch sizes beside the floor (bench/fixed_batch.py), and batch 64 again with the
    tokens drawn on the host; the goal keys name the model (`decode_tok_s_batch64_8b` for llama-3.1-8b)."""
    from fixed_batch import decode_throughput
    from gpu_decode import copy_bandwidth
    from gpu_prefill import gemm_rate

    bw, rate = copy_bandwidth(), gemm_rate()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, fp16 GEMM {rate / 1e12:.0f} TFLOP/s (measured)", flush=True)
    batches = [int(b) for b in a.fixed_batches.split(",") if b.strip()]
    host = 64 if 64 in batches and eng.device_sampling else None
    fb = decode_throughput(eng, batches, a.fixed_context, 64, bw, rate, host_draws_at=host)
    out: dict = {"copy_bandwidth": bw, "gemm_rate": rate, "fixed_batch": fb}
    tag = {"llama-3.1-8b": "_8b"}.get(a.random_weights or "", "")
    for b in batches:
        out[f"decode_tok_s_batch{b}{tag}"] = fb[f"batch{b}"]["decode_tok_s"]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="what to build when no --artifact is given")
    ap.add_argument("--artifact", default=None, help="a built artifact (default: build --model, cached)")
    ap.add_argument(
        "--random-weights",
        nargs="?",
        const="manifest",
        default=None,
        help="seeded random weights for an artifact built without them: a bench/gpu_decode.py shape "
        "(llama-3.1-8b) or, without a value, the config the artifact records; prompts are random token ids",
    )
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt-median", type=int, default=80)
    ap.add_argument("--prompt-max", type=int, default=1024)
    ap.add_argument("--output-median", type=int, default=64)
    ap.add_argument("--output-max", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rates", default="1.5", help="comma-separated arrival rates, requests/s (0: all at once)")
    ap.add_argument("--ttft-limit", type=float, default=None, help="p99 TTFT limit (s) for the sustainable rate")
    ap.add_argument("--repeats", type=int, default=1, help="run everything this many times; report medians")
    ap.add_argument("--policies", default="static,dynamic,continuous")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--max-wait", type=float, default=0.25, help="dynamic policy: max seconds to fill a batch")
    ap.add_argument("--kv-cache-tokens", type=int, default=32768)
    ap.add_argument("--prefix", action="store_true", help="also run the shared-system-prompt workload")
    ap.add_argument("--prefix-tokens", type=int, default=256, help="length of the shared system prompt")
    ap.add_argument("--prefix-rate", type=float, default=None, help="its arrival rate (default: the lowest swept)")
    ap.add_argument("--prefix-requests", type=int, default=None, help="its request count (default: --requests)")
    ap.add_argument("--save", default=None, help="write bench/results/NAME.json with machine, date and commit")
    ap.add_argument("--json", default=None, help="write the figures to this path")
    ap.add_argument(
        "--fixed-batches",
        default=None,
        help="GPU: also decode tok/s at these fixed batch sizes (comma-separated) beside the step's floor",
    )
    ap.add_argument("--fixed-context", type=int, default=512, help="their mean context in tokens")
    ap.add_argument("--fixed-only", action="store_true", help="only the fixed-batch figures (no policy sweep)")
    a = ap.parse_args(argv)
    bad = [
        msg
        for ok, msg in (
            (a.requests >= 2, "--requests must be >= 2"),
            (a.repeats >= 1, "--repeats must be >= 1"),
            (a.ttft_limit is None or a.ttft_limit > 0, "--ttft-limit must be > 0 seconds"),
            (a.prompt_median >= 1 and a.output_median >= 1, "--prompt-median and --output-median must be >= 1"),
            (a.prefix_tokens >= 1, "--prefix-tokens must be >= 1"),
        )
        if not ok
    ]
    try:
        a.rate_list = sorted({float(r) for r in a.rates.split(",") if r.strip()})
    except ValueError:
        bad.append(f"--rates takes comma-separated numbers, got '{a.rates}'")
        a.rate_list = []
    if not a.rate_list or any(r < 0 for r in a.rate_list):
        bad.append("--rates needs at least one rate >= 0 (requests/s)")
    a.policy_list = [p for p in a.policies.split(",") if p]
    from_runtime = ("static", "dynamic", "continuous")
    unknown = [p for p in a.policy_list if p not in from_runtime]
    if unknown or not a.policy_list:
        bad.append(f"--policies takes some of {','.join(from_runtime)}, got '{a.policies}'")
    if bad:
        ap.error("; ".join(bad))
    if a.prefix_rate is None:
        a.prefix_rate = a.rate_list[0] if a.rate_list else 0.0
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    eng, tokens, model = load_engine(a)
    shape = Shape(a.requests, a.prompt_median, a.prompt_max, a.output_median, a.output_max, 0, a.seed)
    wl = make_workload(shape, tokens)
    check_fits(wl, eng, "main")
    pre_wl = prefix_workload(tokens, a) if a.prefix else None
    if pre_wl is not None:
        check_fits(pre_wl, eng, "prefix")
    st = wl.stats
    print(
        f"{model}: {a.requests} requests; prompts mean {st['prompt_tokens_mean']:.0f}, p50 "
        f"{st['prompt_tokens_p50']:.0f}, p99 {st['prompt_tokens_p99']:.0f} tokens; outputs mean "
        f"{st['output_tokens_mean']:.0f}, p50 {st['output_tokens_p50']:.0f}, p99 {st['output_tokens_p99']:.0f}; "
        f"rates {a.rates}/s; max_batch {a.max_batch}, prefill_chunk {a.prefill_chunk}, max_wait {a.max_wait} s, "
        f"page size {eng.page_size}, {eng.pool.num_pages} KV pages, TVM threads {os.environ.get('TVM_NUM_THREADS')}",
        flush=True,
    )
    figures: dict = {}
    if a.fixed_batches:
        figures.update(fixed_batches(eng, a))
    summary: dict = {}
    if not a.fixed_only:
        warm_up(eng, a.max_batch)
        runs = sweep(eng, wl, a, a.policy_list, a.rate_list)
        summary = summarize(runs, a, a.rate_list)
        print_table(summary, a.rate_list)
    figures |= {
        "command": "python bench/serving.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": model,
        "repeats": a.repeats,
        "rates": a.rate_list,
        "ttft_limit_s": a.ttft_limit,
        "workload": {**shape.__dict__, **st},
        "settings": dict(
            max_batch=a.max_batch,
            prefill_chunk=a.prefill_chunk,
            max_wait_s=a.max_wait,
            kv_cache_tokens=a.kv_cache_tokens,
            page_size=eng.page_size,
            tvm_threads=os.environ.get("TVM_NUM_THREADS"),
        ),
        "median_of": a.repeats,
        **summary,
    }
    if pre_wl is not None:
        pre = prefix_runs(eng, pre_wl, a)
        figures["prefix"] = pre
        print(
            f"\nshared system prompt ({a.prefix_tokens} tokens, {pre['workload']['shared_prefix_share']:.0%} of "
            f"prompt tokens) at {a.prefix_rate:g} req/s, continuous: prefix-cache hit rate {pre['hit_rate']:.2f}; "
            f"TTFT mean {pre['ttft_mean_s_cached']:.3f} s cached vs {pre['ttft_mean_s_uncached']:.3f} s uncached "
            f"({pre['ttft_mean_gain']:.2f}x), p99 {pre['ttft_p99_s_cached']:.3f} vs {pre['ttft_p99_s_uncached']:.3f} s "
            f"({pre['ttft_p99_gain']:.2f}x)"
        )
    if a.save:
        from results_io import write_results

        write_results(a.save, figures)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=1)
    eng.close()
    return figures


if __name__ == "__main__":
    main()
    sys.exit(0)
