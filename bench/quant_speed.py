"""Decode speed and artifact size of quantized SmolLM2-135M on the CPU: fp32 vs int8 vs int4, one process.

    .venv/bin/python bench/quant_speed.py [--schemes int8,int4_g128] [--steps 64]

Each variant is built with `kiln build smollm2-135m --quant <scheme>` semantics (RTN; tied embedding
shares the output layer's quantized weight) through the build cache, loaded, and timed on the same
prompt; ratios are against kiln fp32 from the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_generate import _corpus, _settle, bench_kiln_decode, bench_kiln_prefill


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="int8,int4_g128")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    a = ap.parse_args()
    import kiln
    from kiln.models import load_model

    tok = load_model("smollm2-135m").tokenizer
    with open(_corpus(), encoding="latin-1") as f:
        ids = tok(f.read())["input_ids"]
    variants = ["fp32"] + [s.strip() for s in a.schemes.split(",")]
    rows = []
    for v in variants:
        kw = {} if v == "fp32" else {"quant": v}
        path, _ = kiln.cached_build("smollm2-135m", os.path.join(tempfile.mkdtemp(), v), **kw)
        eng = kiln.load(path)
        _settle()
        dec1 = 1 / bench_kiln_decode(eng, [ids[: a.prompt_tokens]], a.steps)
        _settle()
        dec8 = 8 / bench_kiln_decode(
            eng, [ids[i * a.prompt_tokens : (i + 1) * a.prompt_tokens] for i in range(8)], a.steps // 2
        )
        _settle()
        pre = 256 / bench_kiln_prefill(eng, ids[:256], 2)
        rows.append((v, dir_bytes(path), eng.manifest["weight_bytes"], dec1, dec8, pre))
        del eng
    base = rows[0]
    print("\nSmolLM2-135M-Instruct on the CPU, kiln O1, one run\n")
    print(
        "| weights | artifact | vs fp32 | decode b=1 tok/s | vs fp32 | decode b=8 tok/s | vs fp32 "
        "| prefill 256 tok/s | vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for v, size, _wb, d1, d8, pre in rows:
        print(
            f"| {v} | {size / 1e6:.0f} MB | {size / base[1]:.2f}x | {d1:.1f} | {d1 / base[3]:.2f}x | {d8:.1f} | "
            f"{d8 / base[4]:.2f}x | {pre:.0f} | {pre / base[5]:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
