"""kiln vs transformers eager on the CPU: prefill and decode throughput, same model, same prompts, one process.

    .venv/bin/python bench/cpu_generate.py [--model smollm2-135m] [--prompt-tokens 512] [--steps 32]

Prints a table with ratios (kiln / transformers). Absolute times on a shared CPU vary run to run;
the ratios from one run are what to quote.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch


def _settle() -> None:
    time.sleep(0.3)  # let the other runtime's worker threads stop spinning


def bench_hf_prefill(model, ids: list[int], reps: int) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        model(input_ids=x, use_cache=True)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(input_ids=x, use_cache=True)
    return (time.perf_counter() - t0) / reps


def bench_hf_decode(model, prompts: list[list[int]], steps: int) -> float:
    """Seconds per decode step for a batch (all prompts the same length: no padding)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(prompts), use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        past = out.past_key_values
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) / steps


def bench_kiln_prefill(eng, ids: list[int], reps: int) -> float:
    pages = eng.pool.alloc(eng.pool.pages_for(len(ids)))
    try:
        eng.prefill(ids, pages)
        t0 = time.perf_counter()
        for _ in range(reps):
            eng.prefill(ids, pages)
        return (time.perf_counter() - t0) / reps
    finally:
        eng.pool.release(pages)


def bench_kiln_decode(eng, prompts: list[list[int]], steps: int) -> float:
    seqs = [eng.pool.alloc(eng.pool.pages_for(len(p) + steps + 1)) for p in prompts]
    try:
        toks = [int(np.argmax(eng.prefill(p, pg))) for p, pg in zip(prompts, seqs)]
        n = len(prompts[0])
        t0 = time.perf_counter()
        for s in range(steps):
            logits = eng.decode(toks, [n + s] * len(prompts), seqs)
            toks = [int(x) for x in logits.argmax(-1)]
        return (time.perf_counter() - t0) / steps
    finally:
        for pg in seqs:
            eng.pool.release(pg)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", default=None, help="reuse a built artifact (default: build into a temp dir)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="fp32", help="comma-separated: fp32, int8, int4_g128, ... (weight schemes)")
    ap.add_argument("--out", default="cpu_generate", help="results name: bench/results/NAME.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    import kiln
    from kiln.models import load_model

    lm = load_model(a.model)
    model = lm.model
    variants = [v.strip() for v in a.variants.split(",")]
    engines = {}
    for v in variants:
        art = a.artifact if (a.artifact and v == "fp32") else None
        if art is None:
            kw = {} if v == "fp32" else {"quant": v}
            art, _ = kiln.cached_build(a.model, os.path.join(tempfile.mkdtemp(), "art"), **kw)
        engines[v] = kiln.load(art, kv_cache_tokens=16384)
    with open(_corpus(), encoding="latin-1") as f:
        text = f.read()
    ids = lm.tokenizer(text)["input_ids"]
    prefill_ids = ids[: a.prompt_tokens]
    rows = []
    _settle()
    hf = bench_hf_prefill(model, prefill_ids, a.reps)
    ks = []
    for eng in engines.values():
        _settle()
        ks.append(a.prompt_tokens / bench_kiln_prefill(eng, prefill_ids, a.reps))
    rows.append((f"prefill {a.prompt_tokens} tokens (tok/s)", a.prompt_tokens / hf, ks))
    for batch in (1, 8):
        n = a.decode_prompt_tokens
        prompts = [ids[i * n : (i + 1) * n] for i in range(batch)]
        _settle()
        hf = bench_hf_decode(model, prompts, a.steps)
        ks = []
        for eng in engines.values():
            _settle()
            ks.append(batch / bench_kiln_decode(eng, prompts, a.steps))
        rows.append((f"decode batch {batch} (tok/s)", batch / hf, ks))
    print(
        f"\nmodel {a.model}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"TVM threads {os.environ.get('TVM_NUM_THREADS')}, {os.cpu_count()} CPUs\n"
    )
    head = " | ".join(f"kiln {v} | ratio" for v in engines)
    print(f"| measure | transformers eager (fp32) | {head} |")
    print("|---|---|" + "---|---|" * len(engines))
    for name, h, ks in rows:
        cells = " | ".join(f"{k:.1f} | {k / h:.2f}x" for k in ks)
        print(f"| {name} | {h:.1f} | {cells} |")
    from results_io import write_results

    write_results(
        a.out,
        {
            "model": a.model,
            "torch_threads": torch.get_num_threads(),
            "tvm_threads": os.environ.get("TVM_NUM_THREADS"),
            "rows": [
                {
                    "measure": name,
                    "transformers_tok_s": round(h, 2),
                    **{f"kiln_{v}_tok_s": round(k, 2) for v, k in zip(engines, ks)},
                    **{f"kiln_{v}_ratio": round(k / h, 3) for v, k in zip(engines, ks)},
                }
                for name, h, ks in rows
            ],
        },
    )
    return 0


def _corpus() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None:
        sys.exit("needs the Lee corpus: pip install --no-deps gensim==4.4.0")
    return os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data", "lee_background.cor")


if __name__ == "__main__":
    sys.exit(main())
