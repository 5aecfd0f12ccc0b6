"""Decode speed and artifact size of structurally pruned SmolLM2-135M on the CPU: dense vs 20% and 40%
(attention heads + FFN channels, wanda importance on lee.cor), one process.

    .venv/bin/python bench/prune_speed.py [--ratios 0.2,0.4] [--steps 64]

No recovery is run (it changes weights, not shapes or speed). Ratios are against the dense build of
the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_generate import _corpus, _settle, bench_kiln_decode
from quant_speed import dir_bytes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    a = ap.parse_args()
    import kiln
    from kiln.models import load_model

    tok = load_model("smollm2-135m").tokenizer
    with open(_corpus(), encoding="latin-1") as f:
        ids = tok(f.read())["input_ids"]
    rows = []
    for r in [0.0] + [float(x) for x in a.ratios.split(",") if x]:
        kw = {} if r == 0 else {"prune": f"heads={r},ffn={r}", "calib": "lee"}
        path, _ = kiln.cached_build("smollm2-135m", os.path.join(tempfile.mkdtemp(), str(r)), **kw)
        eng = kiln.load(path)
        _settle()
        dec1 = 1 / bench_kiln_decode(eng, [ids[: a.prompt_tokens]], a.steps)
        _settle()
        dec8 = 8 / bench_kiln_decode(
            eng, [ids[i * a.prompt_tokens : (i + 1) * a.prompt_tokens] for i in range(8)], a.steps // 2
        )
        rows.append((r, dir_bytes(path), eng.manifest["num_params"], dec1, dec8))
        del eng
    base = rows[0]
    print("\nSmolLM2-135M-Instruct on the CPU, kiln O1, structured pruning (heads + FFN), one run\n")
    print("| pruned | params | artifact | vs dense | decode b=1 tok/s | vs dense | decode b=8 tok/s | vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r, size, n, d1, d8 in rows:
        print(
            f"| {r:.0%} | {n / 1e6:.1f} M | {size / 1e6:.0f} MB | {size / base[1]:.2f}x | {d1:.1f} | "
            f"{d1 / base[3]:.2f}x | {d8:.1f} | {d8 / base[4]:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
