"""Engines and prompt tokens for bench/serving.py: the real model with corpus prompts (CPU), or an artifact built
without weights given seeded random weights and random prompt ids (the GPU host: TVM's runtime, torch and
transformers only; nothing from kiln's compile side is imported on that path)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np


def corpus_tokens(tokenizer):
    """Prompt tokens from the Lee corpus: a seeded slice of `n` tokens."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None:
        sys.exit("the CPU mode takes its prompts from the Lee corpus: pip install --no-deps gensim==4.4.0")
    path = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data", "lee_background.cor")
    with open(path) as f:
        ids = tokenizer.encode(f.read())

    def take(rng: np.random.Generator, n: int) -> list[int]:
        if n > len(ids):
            sys.exit(f"a prompt of {n} tokens is longer than the corpus ({len(ids)}): lower --prompt-max")
        s = int(rng.integers(0, len(ids) - n + 1))
        return list(ids[s : s + n])

    return take


def random_tokens(vocab: int):
    """Prompt tokens drawn uniformly from the vocabulary (the GPU host has no tokenizer)."""
    return lambda rng, n: rng.integers(0, vocab, size=n).tolist()


def random_weights(manifest: dict, shape: str) -> dict[str, Any]:
    """Seeded random weights for an artifact built without them, made as bench/gpu_decode.py makes them:
    `seeded_model` of the named shape (or of the config the artifact records), then each field packed by the
    cuda target's WeightMaker on the GPU. A cpu artifact (the test path) packs its own blocked layouts."""
    from gpu_decode import SHAPES, _config, seeded_model

    from kiln.targets.cuda.weights import WeightMaker, tensors_of

    if shape in SHAPES:
        cfg = _config(shape)
    else:
        from transformers import LlamaConfig

        cfg = LlamaConfig.from_dict(manifest.get("model") or {})
        if (manifest.get("model") or {}).get("model_type") != "llama":
            sys.exit("--random-weights makes Llama weights: name a shape (llama-3.1-8b) or use a Llama artifact")
    on_gpu = manifest.get("target", {}).get("name") == "cuda"
    model = seeded_model(cfg, "cuda" if on_gpu else "cpu", "float16" if on_gpu else "float32")
    maker = WeightMaker(tensors_of(model))
    if on_gpu:
        return maker.all(manifest)
    import kiln.targets.cpu.layouts  # noqa: F401  (registers the cpu layouts' parser)
    from kiln.targets.common.layouts import parse_layout

    out: dict[str, Any] = {}
    for spec in manifest["weights"]:
        if spec["transform"] in ("raw", "cat"):
            out[spec["name"]] = maker.field(spec)
            continue
        lay = parse_layout(spec["transform"])
        srcs = [maker.source(s).detach().contiguous().numpy() for s in spec["sources"]]
        out[spec["name"]] = lay.pack(srcs)[lay.part]
    return out


def load_engine(a: argparse.Namespace):
    """(engine, prompt-token source, a description of the model)."""
    if a.random_weights:
        if not a.artifact:
            sys.exit("--random-weights needs --artifact DIR (built without weights, e.g. by bench/gpu_decode.py)")
        from kiln.runtime.artifact import read_manifest
        from kiln.runtime.engine import Engine

        man = read_manifest(a.artifact)
        t = time.perf_counter()
        weights = random_weights(man, a.random_weights)
        if man.get("target", {}).get("name") == "cuda":
            import torch

            torch.cuda.empty_cache()  # the seeded model is gone: its memory back to the device, for TVM's pools
        print(f"random weights made in {time.perf_counter() - t:.1f} s", flush=True)
        eng = Engine(a.artifact, kv_cache_tokens=a.kv_cache_tokens, weights=weights, verify=False)
        name = f"{a.random_weights} (seeded random weights), {man.get('target', {}).get('name')}"
        return eng, random_tokens(eng.vocab_size), name
    art = a.artifact
    if art is None:
        import tempfile

        import kiln

        art, _ = kiln.cached_build(a.model, os.path.join(tempfile.mkdtemp(), "art"))
    from kiln.runtime.engine import Engine

    eng = Engine(art, kv_cache_tokens=a.kv_cache_tokens)
    if eng.tokenizer is None:
        sys.exit(f"{art} has no tokenizer for the corpus prompts: pass --random-weights for random token ids")
    return eng, corpus_tokens(eng.tokenizer), a.model
