"""Two CPU artifacts of the same model (say, built before and after a compiler change) timed in one process,
interleaved, so that the machine's load and clock state fall on both alike.

    .venv/bin/python bench/compare_artifacts.py OLD_DIR NEW_DIR [--rounds 6] [--out NAME]

Prints the median tokens/s of each for decode at batch 1 and 8 (64-token prompts) and prefill of 256
tokens, and the ratio new / old; writes bench/results/NAME.json. On a shared CPU, single runs of
bench/cpu_generate.py move by up to 2x between runs: compare compiled code with this instead.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def decode_tok_s(eng, prompt: list[int], batch: int, steps: int = 24) -> float:
    seqs = [eng.pool.alloc(eng.pool.pages_for(len(prompt) + steps + 1)) for _ in range(batch)]
    try:
        toks = [int(np.argmax(eng.prefill(prompt, pg))) for pg in seqs]
        t0 = time.perf_counter()
        for s in range(steps):
            logits = eng.decode(toks, [len(prompt) + s] * batch, seqs)
            toks = [int(x) for x in logits.argmax(-1)]
        return batch * steps / (time.perf_counter() - t0)
    finally:
        for pg in seqs:
            eng.pool.release(pg)


def prefill_tok_s(eng, ids: list[int]) -> float:
    pages = eng.pool.alloc(eng.pool.pages_for(len(ids)))
    try:
        t0 = time.perf_counter()
        eng.prefill(ids, pages)
        return len(ids) / (time.perf_counter() - t0)
    finally:
        eng.pool.release(pages)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="compare_artifacts")
    a = ap.parse_args()
    import kiln

    engines = {"old": kiln.load(a.old, kv_cache_tokens=16384), "new": kiln.load(a.new, kv_cache_tokens=16384)}
    vocab = int(engines["new"].manifest["model"].get("vocab_size", 1000))
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, 64).tolist()
    long = rng.integers(0, vocab, 256).tolist()
    measures = ("decode_b1", "decode_b8", "prefill_256")
    runs: dict[str, dict[str, list[float]]] = {k: {m: [] for m in measures} for k in engines}
    for r in range(a.rounds):
        for k in ("old", "new") if r % 2 == 0 else ("new", "old"):  # alternate who goes first
            e = engines[k]
            runs[k]["decode_b1"].append(decode_tok_s(e, prompt, 1))
            runs[k]["decode_b8"].append(decode_tok_s(e, prompt, 8))
            runs[k]["prefill_256"].append(prefill_tok_s(e, long))
    med = {k: {m: float(np.median(v)) for m, v in r.items()} for k, r in runs.items()}
    print("| measure (tok/s, median) | old | new | new / old |\n|---|---|---|---|")
    for m in med["old"]:
        print(f"| {m} | {med['old'][m]:.1f} | {med['new'][m]:.1f} | {med['new'][m] / med['old'][m]:.3f} |")
    from results_io import write_results

    write_results(
        a.out,
        {
            "old": a.old,
            "new": a.new,
            "rounds": a.rounds,
            "median_tok_s": med,
            "ratio_new_over_old": {m: round(med["new"][m] / med["old"][m], 3) for m in med["old"]},
            "runs_tok_s": runs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
