"""Models and artifacts shared by the cuda tests: built on any host (TVM's compiler, no GPU), run on a GPU
host with TVM's runtime only.

    python tests/cuda_models.py OUT_DIR     # build every test artifact into OUT_DIR
    KILN_CUDA_ARTIFACTS=OUT_DIR python -m pytest -m gpu tests/test_cuda.py   # on the GPU host

Weights are not carried: each artifact is built from shapes alone, and the GPU test recreates the
same seeded model there.
"""

from __future__ import annotations

import os
import sys

import torch

# name -> (config kwargs, seed). "smollm2-135m" has SmolLM2-135M's exact architecture (random weights:
# the real checkpoint is packaged for the build host only).
MODELS = {
    "tiny-llama": (
        dict(
            hidden_size=512,
            intermediate_size=640,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=1,
            vocab_size=1000,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        ),
        0,
    ),
    "tiny-window": (
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=500,
            max_position_embeddings=1024,
            sliding_window=24,
        ),
        1,
    ),
    "smollm2-135m": (
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=2048,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
        2,
    ),
}
VARIANTS = {"fp16": {}, "int8": {"quant": "int8"}, "int4": {"quant": "int4_g128"}}
MAX_CONTEXT = 1024


def make_model(name: str, device: str = "cpu", meta: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    kw, seed = MODELS[name]
    cls, cfg = (MistralForCausalLM, MistralConfig) if "sliding_window" in kw else (LlamaForCausalLM, LlamaConfig)
    config = cfg(**kw)
    if meta:
        from accelerate import init_empty_weights

        with init_empty_weights():
            return cls(config).eval()
    torch.manual_seed(seed)
    with torch.device(device):
        m = cls(config)
    with torch.no_grad():  # spread the logits so greedy choices are well separated
        for n, p in m.named_parameters():
            if p.dim() == 2:
                p.mul_(3.0 if "embed" not in n else 1.0)
    return m.eval()


def artifact_name(model: str, variant: str) -> str:
    return f"{model}-{variant}"


def build(out: str, models=tuple(MODELS), variants=tuple(VARIANTS), arch: str = "sm_90a") -> dict[str, str]:
    import kiln

    paths = {}
    for name in models:
        m = make_model(name, meta=True)
        for v in variants:
            path = os.path.join(out, artifact_name(name, v))
            kiln.compile(m, target="cuda", max_context=MAX_CONTEXT, pack_weights=False, **VARIANTS[v]).save(
                path
            ) if not os.path.exists(os.path.join(path, "manifest.json")) else None
            paths[(name, v)] = path
    return paths


if __name__ == "__main__":
    build(sys.argv[1])
