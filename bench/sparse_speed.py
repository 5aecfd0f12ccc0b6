"""Batch-1 decode speed and resident weight memory of 2:4 sparse SmolLM2-135M on the CPU: the compressed
2:4 kernels against the dense kernels on the same pruned weights (fp32, and int4 g128), one process.

    .venv/bin/python bench/sparse_speed.py [--steps 64] [--method magnitude] [--quant int4_g128] [--lm-head]

Both builds of a pair come from one pipeline (sparsify{pattern=2:4} before fuse-mlp); the dense one adds
compressed=false, so the weights, and the tokens, are the same and only the kernels and layouts differ.
The LM head (tied to the embedding: a fifth of the weights) stays dense in both, as sparsify leaves it by
default; --lm-head makes it 2:4 too (sparsify{lm_head=true}; the embedding then reads its rows out of the
compressed layout) and writes bench/results/sparse_speed_lm_head.json instead. Resident bytes
are the weight fields as loaded; the floor of a decode step is those bytes over the host's measured read
bandwidth (every weight is read once per token). All four engines are loaded at once and take turns
(--rounds), each keeping its best turn. Figures go to bench/results/sparse_speed.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_generate import _corpus, _settle, bench_kiln_decode
from results_io import write_results


def read_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Bytes per second one pass of summing a large array reads, best of `reps` (all cores: numpy's sum is
    single-threaded, so two halves run in two threads)."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(mib * 2**20 // 4, np.float32)
    parts = np.array_split(a, len(os.sched_getaffinity(0)))
    best = float("inf")
    with ThreadPoolExecutor(len(parts)) as ex:
        for _ in range(reps):
            t = time.perf_counter()
            list(ex.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def resident_bytes(manifest: dict) -> int:
    """The weight fields as the engine holds them (a dense build's compactly stored 2:4 fields expand)."""
    return sum(int(np.prod(w["shape"])) * np.dtype(w["dtype"]).itemsize for w in manifest["weights"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="turns each variant takes; its best counts")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--method", default="magnitude", help="sparsify method (speed does not depend on it)")
    ap.add_argument("--quant", default="int4_g128")
    ap.add_argument("--lm-head", action="store_true", help="sparsify the tied LM head / embedding too")
    a = ap.parse_args()
    import kiln
    from kiln.models import load_model
    from kiln.pass_options import build_pipeline

    tok = load_model("smollm2-135m").tokenizer
    with open(_corpus(), encoding="latin-1") as f:
        ids = tok(f.read())["input_ids"][: a.prompt_tokens]
    calib = {"calib": "lee"} if a.method != "magnitude" else {}
    engines: dict[str, object] = {}
    for quant in (None, a.quant):
        pipe = build_pipeline("O1", sparsify="2:4", sparsify_method=a.method, quant=quant)
        if a.lm_head:
            pipe = pipe.replace("pattern=2:4", "pattern=2:4,lm_head=true")
        for compressed in (False, True):
            name = ("2:4" if compressed else "dense") + (f" {quant}" if quant else " fp32")
            p = pipe if compressed else pipe.replace("pattern=2:4", "pattern=2:4,compressed=false")
            path, _ = kiln.cached_build("smollm2-135m", os.path.join(tempfile.mkdtemp(), "m"), passes=p, **calib)
            engines[name] = kiln.load(path)
    # the host is shared: the variants take turns, a.rounds times, and each keeps its best round, so a burst
    # of other work slows one round of one variant, not the ratio
    best: dict[str, float] = {}
    for _ in range(a.rounds):
        for name, eng in engines.items():
            _settle()
            best[name] = min(best.get(name, float("inf")), bench_kiln_decode(eng, [ids], a.steps))
    rows = {
        name: {"decode_tok_s": round(1 / best[name], 2), "resident_bytes": resident_bytes(eng.manifest)}
        for name, eng in engines.items()
    }
    del engines
    bw = read_bandwidth()
    for r in rows.values():
        r["floor_tok_s"] = round(bw / r["resident_bytes"], 2)
        r["share_of_floor"] = round(r["decode_tok_s"] / r["floor_tok_s"], 3)
    q = a.quant
    figures = {
        "command": "bench/sparse_speed.py " + " ".join(sys.argv[1:]),
        "model": "smollm2-135m",
        "sparsify": f"2:4 {a.method}, LM head {'2:4' if a.lm_head else 'dense'}",
        "read_bandwidth_gb_s": round(bw / 1e9, 2),
        "cpu_24_over_dense": round(rows["2:4 fp32"]["decode_tok_s"] / rows["dense fp32"]["decode_tok_s"], 3),
        "cpu_24int4_over_int4": round(rows[f"2:4 {q}"]["decode_tok_s"] / rows[f"dense {q}"]["decode_tok_s"], 3),
        "resident_weight_ratio": round(rows["2:4 fp32"]["resident_bytes"] / rows["dense fp32"]["resident_bytes"], 3),
        "resident_weight_ratio_int4": round(
            rows[f"2:4 {q}"]["resident_bytes"] / rows[f"dense {q}"]["resident_bytes"], 3
        ),
        "variants": rows,
    }
    print(
        f"\nSmolLM2-135M on the CPU, 2:4 ({a.method}), batch-1 decode, one run (best of {a.rounds} turns); "
        f"read bandwidth {bw / 1e9:.1f} GB/s\n"
    )
    print("| weights | resident | vs dense | decode tok/s | vs dense | floor tok/s | share of floor |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        base = rows[name.replace("2:4", "dense")]
        print(
            f"| {name} | {r['resident_bytes'] / 1e6:.0f} MB | {r['resident_bytes'] / base['resident_bytes']:.2f}x | "
            f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['floor_tok_s']:.1f} | "
            f"{r['share_of_floor']:.0%} |"
        )
    write_results("sparse_speed_lm_head" if a.lm_head else "sparse_speed", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
