"""Fixed-batch decode throughput beside its floor: B sequences at a given context decode together, greedy.

Used by bench/serving.py (`--fixed-batches`). For each batch size, B random prompts of `context - new / 2`
tokens generate `new` tokens each through `Engine.generate` (a static batch), so the contexts average
`context`; decode tokens/s counts the B x (new - 1) tokens after the first, over the time from the first decode
step to the end (the scheduler's host work between steps included).

The floor of a step: the bytes it must read (every streamed weight once, the K/V of B contexts) over the
measured copy bandwidth, against the FLOPs of its matrix products (2 x streamed parameters x B, plus attention's
4 x layers x heads x head_dim x context x B) over the measured fp16 GEMM rate; the step cannot beat the larger.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np


def model_facts(eng) -> dict[str, Any]:
    """Bytes a decode step streams (every weight but an untied embedding table, of which one row a token is
    read), K/V bytes a cached token, parameters multiplied a token, and attention's shape."""
    man = eng.manifest
    model = man.get("model") or {}
    tied = bool(model.get("tie_word_embeddings"))
    streamed = 0
    for s, w in zip(man["weights"], eng.weights):
        if not tied and all(x.startswith("model.embed_tokens") for x in s["sources"]):
            continue
        streamed += int(np.prod(w.shape)) * np.dtype(str(w.dtype)).itemsize
    layers = int(model.get("num_hidden_layers") or 0)
    heads = int(model.get("num_attention_heads") or 0)
    kv_heads = int(model.get("num_key_value_heads") or heads)
    head_dim = int(model.get("head_dim") or (int(model.get("hidden_size") or 0) // max(heads, 1)))
    hidden, ffn, vocab = (int(model.get(k) or 0) for k in ("hidden_size", "intermediate_size", "vocab_size"))
    # parameters a token is multiplied by: the projections and the LM head (not the embedding lookup)
    mult = layers * (hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * ffn) + vocab * hidden
    kv_token = 0  # the bytes one cached token takes over the engine's paged cache tensors (any dtype)
    for c, t in zip(eng.caches, eng.kv_layout.tensors):
        if t.paged:
            kv_token += (
                int(np.prod(c.shape)) * np.dtype(str(c.dtype)).itemsize // (c.shape[t.page_axis] * eng.page_size)
            )
    return {
        "streamed_bytes": streamed,
        "kv_bytes_per_token": kv_token,
        "multiplied_params": mult,
        "attention_flops_per_context_token": 4 * layers * heads * head_dim,
    }


def decode_throughput(
    eng, batches: list[int], context: int, new: int, bw: float, rate: float, host_draws_at: int | None = None
) -> dict[str, Any]:
    """Decode tokens/s at each fixed batch, each beside its floor; with `host_draws_at`, that batch again with
    the tokens drawn on the host from copied logits (the engine's `device_sampling` off)."""
    from kiln.runtime.sampling import SamplingParams

    facts = model_facts(eng)
    rng = np.random.default_rng(0)
    prompt_len = context - new // 2
    out: dict[str, Any] = {"context": context, "new_tokens": new, **facts}
    runs = [(b, True) for b in batches] + ([(host_draws_at, False)] if host_draws_at else [])
    for b, on_device in runs:
        prompts = [rng.integers(0, eng.vocab_size, size=prompt_len).tolist() for _ in range(b)]
        eng.device_sampling = on_device and bool(eng.manifest.get("target", {}).get("sampler"))
        inner = eng.decode_step
        spent, first = [0.0], [0.0]

        def timed(*args, **kw):  # the engine's share of a step; the rest is the scheduler's host work
            t0 = time.perf_counter()
            first[0] = first[0] or t0
            try:
                return inner(*args, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        try:
            eng.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))  # captures this batch's graph
            eng.decode_step = timed
            timers = _time_host() if str(b) in os.environ.get("KILN_TIME_HOST", "").split(",") else None
            prof = None
            if os.environ.get("KILN_PROFILE_HOST") == str(b):  # the scheduler's host work at this batch
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            eng.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
            end = time.perf_counter()
            if timers is not None:
                print(
                    f"  host work at batch {b}, ms a step: "
                    + ", ".join(f"{k} {v / (new - 1) * 1e3:.2f}" for k, v in timers.pop("stop")().items()),
                    flush=True,
                )
            if prof is not None:
                import pstats

                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        finally:
            eng.device_sampling = bool(eng.manifest.get("target", {}).get("sampler"))
            eng.__dict__.pop("decode_step", None)  # the bound method again
        # the static batch prefills every prompt, then decodes: from the first decode step to the end, with the
        # scheduler's work between steps (admission and the prompts' validation come before and are not counted)
        step = (end - first[0]) / (new - 1)
        t_bytes = (facts["streamed_bytes"] + facts["kv_bytes_per_token"] * b * context) / bw
        flops = b * (2 * facts["multiplied_params"] + facts["attention_flops_per_context_token"] * context)
        t_flops = flops / rate
        floor = max(t_bytes, t_flops)
        r = {
            "decode_tok_s": b / step,
            "step_ms": step * 1e3,
            "floor_ms": floor * 1e3,
            "bytes_floor_ms": t_bytes * 1e3,
            "flops_floor_ms": t_flops * 1e3,
            "floor_tok_s": b / floor,
            "share_of_floor": floor / step,
            "engine_step_ms": spent[0] / (new - 1) * 1e3,
        }
        key = f"batch{b}" + ("" if on_device else "_host_draws")
        out[key] = r
        print(
            f"  fixed batch {b:>4}{'' if on_device else ' (host draws)'}: {r['decode_tok_s']:9.1f} tok/s, "
            f"step {r['step_ms']:.2f} ms (engine {r['engine_step_ms']:.2f}); floor {r['floor_ms']:.2f} ms "
            f"(bytes {r['bytes_floor_ms']:.2f}, FLOPs "
            f"{r['flops_floor_ms']:.2f}) = {r['floor_tok_s']:.0f} tok/s; {100 * r['share_of_floor']:.0f}% of it",
            flush=True,
        )
    return out


def _time_host() -> dict:
    """Wall time spent in the scheduler's per-step methods and in Python's garbage collector, until
    `timers["stop"]()` puts the methods back and returns the totals (seconds)."""
    import gc

    from kiln.runtime.serving import Server

    totals: dict = {}
    saved = {}

    def wrap(name):
        fn = saved[name] = getattr(Server, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

        setattr(Server, name, timed)

    for name in ("_emit", "_reserve", "_flush_deferred", "_sample", "_decode", "_step"):
        wrap(name)
    gc_start = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            key = f"gc{info.get('generation')}"
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - gc_start[0]

    gc.callbacks.append(on_gc)

    def stop():
        gc.callbacks.remove(on_gc)
        for name, fn in saved.items():
            setattr(Server, name, fn)
        return dict(totals)

    totals["stop"] = stop
    return totals
