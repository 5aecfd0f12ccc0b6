"""Speculative decoding on the real model: single-stream decode tok/s with and without a draft, same run.

    .venv/bin/python bench/speculative.py [--draft-layers 4] [--k 4] [--new-tokens 128] [--artifact DIR]

The draft is SmolLM2-135M cut to its first `--draft-layers` decoder layers (same tokenizer, same final norm
and LM head), compiled by kiln. Greedy sampling; the speculative output is checked to be identical to the
target's. Also runs the target drafting for itself (acceptance 1.0: the cost of the mechanism alone).
Prompts are slices of the Lee corpus. Times on a shared CPU vary run to run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


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
    import json

    import kiln

    path, _ = kiln.cached_build(model, out)
    if "verify" not in json.load(open(os.path.join(path, "manifest.json")))["entry_points"]:
        path, _ = kiln.cached_build(model, out + "-v", use_cache=False)  # stale cache entry without verify
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", default=None, help="target artifact (default: kiln.cached_build)")
    ap.add_argument("--draft-artifact", default=None, help="reuse a built draft (default: build one)")
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    from serving import corpus_ids

    import kiln
    from kiln.runtime.sampling import SamplingParams
    from kiln.runtime.speculative import SpeculativeDecoder

    tmp = tempfile.mkdtemp()
    art = a.artifact or target_artifact(a.model, os.path.join(tmp, "target"))
    dart = a.draft_artifact
    if dart is None or not os.path.exists(os.path.join(dart, "manifest.json")):
        t = time.perf_counter()
        dart = build_draft(a.model, a.draft_layers, dart or os.path.join(tmp, "draft"))
        print(f"draft ({a.draft_layers} layers) built in {time.perf_counter() - t:.0f} s", flush=True)
    target = kiln.load(art, kv_cache_tokens=4096)
    draft = kiln.load(dart, kv_cache_tokens=4096)
    ids = corpus_ids(target.tokenizer)
    rng = np.random.default_rng(0)
    prompts = [ids[s : s + a.prompt_tokens] for s in rng.integers(0, len(ids) - a.prompt_tokens, a.prompts)]
    sp = SamplingParams(max_tokens=a.new_tokens, ignore_eos=True)
    target.generate([prompts[0]], SamplingParams(max_tokens=4))  # warm up

    def timed(fn):
        toks, secs = 0, 0.0
        outs = []
        for p in prompts:
            t = time.perf_counter()
            o = fn(p)
            secs += time.perf_counter() - t - o.prefill_seconds  # decode phase only
            toks += len(o.token_ids) - 1  # the first token comes from prefill
            outs.append(o.token_ids)
        return toks / secs, outs

    rows = []
    base, ref = timed(lambda p: target.generate([p], sp)[0])
    rows.append(("target alone", base, None, None, True))
    for name, d in ((f"draft: first {a.draft_layers} layers", draft), ("draft: the target itself", target)):
        sd = SpeculativeDecoder(target, d, k=a.k)
        tps, outs = timed(lambda p: sd.generate(p, sp))
        st = sd.stats()
        rows.append((name, tps, st["acceptance_rate"], st["spec_k"], outs == ref))
    dtps, _ = timed(lambda p: draft.generate([p], sp)[0])
    print(
        f"\n{a.model}, {a.prompts} prompts of {a.prompt_tokens} tokens, {a.new_tokens} new tokens each, greedy, "
        f"k starts at {a.k} (adaptive, 1..8); TVM threads {os.environ.get('TVM_NUM_THREADS')}\n"
    )
    print("| decoding | decode tok/s | vs target alone | acceptance rate | final k | output identical |")
    print("|---|---|---|---|---|---|")
    for name, tps, acc, k, same in rows:
        print(
            f"| {name} | {tps:.1f} | {tps / base:.2f}x | {'-' if acc is None else f'{acc:.2f}'} | "
            f"{'-' if k is None else k} | {same} |"
        )
    print(f"| (draft alone, for reference) | {dtps:.1f} | {dtps / base:.2f}x | - | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
