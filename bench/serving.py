"""Scheduling policies on the real model: static vs dynamic vs continuous batching, same workload, one process.

    .venv/bin/python bench/serving.py [--requests 64] [--rate 4] [--max-batch 16] [--artifact DIR]

The workload: `--requests` requests arriving as a seeded Poisson process of `--rate` requests/s; prompts
are seeded slices of the Lee corpus (gensim's lee_background.cor) of mixed lengths, outputs of mixed
lengths (ignore_eos, so every policy generates the same tokens). Each policy gets a fresh Server on the
same Engine and replays the same arrivals. Prints throughput, TTFT and time per output token (mean and
p99), peak KV pages, and the ratios continuous / static. Times on a shared CPU vary run to run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np


def corpus_ids(tokenizer) -> list[int]:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None:
        sys.exit("needs the Lee corpus: pip install --no-deps gensim==4.4.0")
    path = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data", "lee_background.cor")
    with open(path) as f:
        return tokenizer.encode(f.read())


def workload(ids: list[int], n: int, seed: int, prompt_range, out_range, rate: float):
    rng = np.random.default_rng(seed)
    plens = rng.integers(prompt_range[0], prompt_range[1] + 1, size=n)
    olens = rng.integers(out_range[0], out_range[1] + 1, size=n)
    starts = rng.integers(0, len(ids) - prompt_range[1], size=n)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n)) if rate > 0 else np.zeros(n)
    arrivals -= arrivals[0]
    return [(float(a), ids[s : s + p], int(o)) for a, s, p, o in zip(arrivals, starts, plens, olens)]


def run_policy(engine, policy: str, reqs, a) -> dict:
    from kiln.runtime.sampling import SamplingParams
    from kiln.runtime.serving import Server

    srv = Server(engine, policy=policy, max_batch=a.max_batch, prefill_chunk=a.prefill_chunk, max_wait_s=a.max_wait)
    handles = []

    def client():
        t0 = time.perf_counter()
        for at, prompt, n in reqs:
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
            handles.append(srv.submit(prompt, SamplingParams(max_tokens=n, ignore_eos=True)))

    th = threading.Thread(target=client)
    th.start()
    th.join()
    outs = [h.result() for h in handles]
    m = srv.metrics()
    srv.close()
    assert all(len(o.token_ids) == n for o, (_, _, n) in zip(outs, reqs))
    m["outputs"] = [o.token_ids for o in outs]
    return m


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", default=None, help="reuse a built artifact (default: kiln.cached_build)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=4.0, help="arrivals per second (0: all at once)")
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=(16, 256))
    ap.add_argument("--output-tokens", type=int, nargs=2, default=(16, 256))
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--max-wait", type=float, default=0.25, help="dynamic policy: max seconds to fill a batch")
    ap.add_argument("--kv-cache-tokens", type=int, default=16384)
    ap.add_argument("--policies", default="static,dynamic,continuous")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import kiln

    art = a.artifact
    if art is None:
        art, _ = kiln.cached_build(a.model, os.path.join(tempfile.mkdtemp(), "art"))
    eng = kiln.load(art, kv_cache_tokens=a.kv_cache_tokens)
    reqs = workload(corpus_ids(eng.tokenizer), a.requests, a.seed, a.prompt_tokens, a.output_tokens, a.rate)
    print(
        f"{a.requests} requests, arrivals {a.rate}/s over {reqs[-1][0]:.1f} s, prompts "
        f"{a.prompt_tokens[0]}-{a.prompt_tokens[1]} tokens (total {sum(len(r[1]) for r in reqs)}), outputs "
        f"{a.output_tokens[0]}-{a.output_tokens[1]} (total {sum(r[2] for r in reqs)}); max_batch {a.max_batch}, "
        f"prefill_chunk {a.prefill_chunk}, max_wait {a.max_wait} s, page size {eng.page_size}, "
        f"TVM threads {os.environ.get('TVM_NUM_THREADS')}",
        flush=True,
    )
    eng.generate([reqs[0][1]], kiln.SamplingParams(max_tokens=2))  # warm up
    res = {}
    for pol in a.policies.split(","):
        t = time.perf_counter()
        res[pol] = run_policy(eng, pol, reqs, a)
        print(f"  {pol}: {time.perf_counter() - t:.1f} s", flush=True)
    names = list(res)
    same = all(res[n]["outputs"] == res[names[0]]["outputs"] for n in names)
    print(f"\ngreedy outputs identical across policies: {same}\n")
    print(
        "| policy | output tok/s | TTFT mean (s) | TTFT p99 (s) | TPOT mean (ms) | TPOT p99 (ms) | peak KV pages "
        "| preemptions | prefix-hit tokens | wall (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, m in res.items():
        print(
            f"| {n} | {m['tokens_per_s']:.1f} | {m['ttft_mean_s']:.2f} | {m['ttft_p99_s']:.2f} | "
            f"{1e3 * m['tpot_mean_s']:.1f} | {1e3 * m['tpot_p99_s']:.1f} | {m['pages_peak_used']} / "
            f"{m['pages_total']} | {m['preemptions']} | {m['prefix_hit_tokens']} | {m['wall_s']:.1f} |"
        )
    if "static" in res and "continuous" in res:
        s, c = res["static"], res["continuous"]
        print(
            f"\ncontinuous / static: throughput {c['tokens_per_s'] / s['tokens_per_s']:.2f}x, "
            f"p99 TTFT {c['ttft_p99_s'] / s['ttft_p99_s']:.2f}x, mean TTFT {c['ttft_mean_s'] / s['ttft_mean_s']:.2f}x, "
            f"p99 TPOT {c['tpot_p99_s'] / s['tpot_p99_s']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
