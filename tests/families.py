"""Tiny random-weight decoders of many transformers families, for the family matrix (test_families.py).

Each family is a config override on top of shared tiny sizes (hidden 64, 2 layers, vocabulary 97);
weights are re-drawn from a per-family seed with a spread wide enough that greedy choices are well
separated (transformers' own init is near-uniform at this size, which makes argmax ties likely).
"""

from __future__ import annotations

import zlib

import torch

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=4, mamba_expand=2)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)

# family -> config overrides (on COMMON); the comment says what the family brings to the matrix
SPECS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 5},  # sliding window
    "qwen2": {},  # qkv bias
    "qwen3": {"head_dim": 16},  # qk-norm
    "gemma": {"head_dim": 16},  # (1 + w) norms, scaled embeddings, gelu_tanh
    "gemma2": {"head_dim": 16, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 10.0, "sliding_window": 6},
    "gemma3_text": {"head_dim": 16, "sliding_window": 6},  # qk-norm, local/global layers
    "phi": {"partial_rotary_factor": 0.5},  # partial rotary, parallel attention + MLP, layer norm with bias
    "phi3": {},  # fused qkv and gate/up projections
    "gpt2": {"tie_word_embeddings": True},  # learned positions, tied head, Conv1D
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},  # local attention, no scale
    "gptj": {"rotary_dim": 8},  # interleaved partial rotary, parallel block
    "gpt_neox": {"rotary_pct": 0.5, "use_parallel_residual": True},  # parallel residual, partial rotary
    "gpt_bigcode": {"multi_query": True},  # multi-query attention
    "falcon": {"parallel_attn": True, "new_decoder_architecture": False, "multi_query": True},
    "bloom": {"n_head": 4},  # ALiBi
    "opt": {"ffn_dim": 96, "word_embed_proj_dim": 64},  # learned positions from a cumsum of the mask
    "stablelm": {"partial_rotary_factor": 0.25},
    "starcoder2": {},  # biases everywhere, gelu MLP
    "olmo": {},  # layer norm without weight or bias
    "olmo2": {},  # post-norms, qk-norm over all heads
    "cohere": {"logit_scale": 0.5, "use_qk_norm": True},  # logit scaling, interleaved rotary, parallel block
    "granite": {"logits_scaling": 2.0, "residual_multiplier": 0.5, "embedding_multiplier": 3.0},
    "smollm3": {},  # layers without rotary (NoPE)
    "codegen": {"rotary_dim": 8},
    "persimmon": {},  # squared relu, partial rotary, qk layer norm
    "glm": {"head_dim": 16, "partial_rotary_factor": 0.5},
    "mixtral": {**MOE},  # softmax -> top-k -> renormalize
    "qwen2_moe": {**MOE, "shared_expert_intermediate_size": 64},  # sigmoid-gated shared expert
    "qwen3_moe": {**MOE, "head_dim": 16},
    "olmoe": {**MOE},  # top-k without renormalizing
    "jetmoe": {**MOE},
    "phimoe": {**MOE},
    "mamba": {"state_size": 8, "conv_kernel": 4, "expand": 2},  # selective scan + causal conv, no attention
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 2, "state_size": 8, "chunk_size": 4},  # scalar A per head
    "falcon_mamba": {"state_size": 8, "conv_kernel": 4, "expand": 2},  # Mamba-1 with RMS-normed dt, B, C
    "bamba": {"attn_layer_indices": [1], **MAMBA2},  # Mamba-2 and attention layers
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], **MAMBA2, **MOE, "shared_intermediate_size": 64},
    "falcon_h1": {**MAMBA2, "mamba_d_ssm": 128},  # attention and Mamba-2 side by side in every layer
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1}
    | {"mamba_d_state": 8, "mamba_expand": 2, "use_mamba_kernels": False, **MOE},  # Mamba-1, attention, MoE
    "zamba2": {"mamba_d_state": 8, "mamba_headdim": 16, "n_mamba_heads": 8, "layers_block_type": ["mamba", "hybrid"]}
    | {"num_mem_blocks": 1, "use_mem_rope": True, "chunk_size": 4},  # Mamba-2 + a shared attention block
    "nemotron_h": {"hybrid_override_pattern": "M*", "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 8}
    | {"n_groups": 1, "chunk_size": 4},
    "lfm2": {"layer_types": ["conv", "full_attention"], "conv_L_cache": 3, "block_ff_dim": 96},  # gated short conv
}


# a tied head repeats tokens more easily: a seed whose continuations are not degenerate
SEEDS = {"gpt2": 4}


def tiny_family(family: str, seed: int | None = None) -> torch.nn.Module:
    """A 2-layer model of `family` with re-drawn random weights (fp32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    over = dict(SPECS[family])
    mt = over.pop("model_type", family)
    cfg = AutoConfig.for_model(mt, **{**COMMON, **over})
    torch.manual_seed(seed if seed is not None else SEEDS.get(family, zlib.crc32(family.encode())))
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(1.0, 0.1) if p.abs().mean() > 0.5 else p.normal_(0.0, 0.1)
    return m.eval()


# families with state-space (recurrent) layers: kv-cache gives them a fixed-size state per sequence
SSM_FAMILIES = ("mamba", "mamba2", "falcon_mamba", "bamba", "granitemoehybrid", "falcon_h1", "jamba", "zamba2")
SSM_FAMILIES += ("nemotron_h", "lfm2")
MOE_FAMILIES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "jetmoe", "phimoe"})


# family -> (reason, exception): the trace or its check fails for a reason kiln has not addressed yet
XFAIL_TRACE: dict[str, tuple[str, type]] = {}
XFAIL_BUILD: dict[str, tuple[str, type]] = {}


def _xfails() -> None:
    from kiln.errors import UnsupportedOpError

    XFAIL_TRACE.update(
        {
            "jetmoe": (
                "aten.scatter.value (router gates) has no conversion nor a torch decomposition",
                UnsupportedOpError,
            ),
            "phimoe": (
                "aten.max.dim (sparsemixer routing) has no conversion nor a torch decomposition",
                UnsupportedOpError,
            ),
        }
    )
    XFAIL_BUILD.update({f: v for f, v in XFAIL_TRACE.items()})
    XFAIL_BUILD.update({})


_xfails()
