"""The real model: SmolLM2-135M-Instruct (GGUF weights), built once, checked against transformers."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import hf_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from kiln.api import cached_build
    from kiln.models import load_model

    out = str(tmp_path_factory.mktemp("smol") / "smollm2")
    path, _ = cached_build("smollm2-135m", out)
    return path, load_model("smollm2-135m")


@pytest.fixture(scope="module")
def engine(smol):
    import kiln

    return kiln.load(smol[0], kv_cache_tokens=4096)


CHATS = [
    "What is the capital of France?",
    "Write a haiku about compilers.",
    "List three uses of a paperclip, then explain which one is the most creative and why.",
]


def test_prefill_logits_match_transformers(engine, smol):
    lm = smol[1]
    for text in ("Hello", "The quick brown fox jumps over the lazy dog.", CHATS[2] * 3):
        ids = lm.tokenizer(text)["input_ids"]
        pages = engine.pool.alloc(engine.pool.pages_for(len(ids)))
        try:
            got = engine.prefill(ids, pages)
        finally:
            engine.pool.release(pages)
        with torch.no_grad():
            ref = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        err = float((torch.from_numpy(got) - ref).abs().max() / ref.abs().max())
        assert err < 1e-4, (text, err)


def test_batched_greedy_generation_equals_transformers(engine, smol):
    from kiln.runtime.sampling import SamplingParams

    lm = smol[1]
    prompts = [
        lm.tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
        for c in CHATS
    ]
    outs = engine.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    lengths = set()
    for p, o in zip(prompts, outs):
        ids = lm.tokenizer(p)["input_ids"]
        lengths.add(len(ids))
        assert o.prompt_ids == ids  # the runtime tokenizer agrees with transformers'
        assert o.token_ids == hf_greedy(lm.model, ids, 32)
    assert len(lengths) == 3


def _kiln(*args):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_run_inspect_and_build_cache(smol, tmp_path):
    r = _kiln("run", smol[0], "--prompt", "What is the capital of France?", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r = _kiln("inspect", smol[0])
    assert r.returncode == 0 and "fuse-attention" in r.stdout and "cached-attention 30" in r.stdout
    r = _kiln("build", "smollm2-135m", "-o", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    assert "served from the build cache" in r.stderr
    assert os.path.exists(tmp_path / "again" / "manifest.json")


def test_cli_errors_are_clear(smol, tmp_path):
    r = _kiln("run", smol[0], "--prompt", "hi " * 9000, "--max-tokens", "4")
    assert r.returncode == 1 and "shorten the prompt" in r.stderr
    r = _kiln("build", "no-such-model", "-o", str(tmp_path / "x"))
    assert r.returncode == 1 and "cannot find model 'no-such-model'" in r.stderr
    assert not os.path.exists(tmp_path / "x")


def test_int8_build_from_the_cli_is_smaller_and_still_answers(smol, tmp_path):
    out = tmp_path / "int8"
    r = _kiln("build", "smollm2-135m", "-o", str(out), "--quant", "int8")
    assert r.returncode == 0, r.stderr
    import json

    m = json.loads((out / "manifest.json").read_text())
    fp32 = json.loads(open(os.path.join(smol[0], "manifest.json")).read())
    assert m["quantization"]["weights"]["name"] == "int8" and m["quantization"]["embedding"] == "int8"
    assert m["weight_bytes"] < 0.3 * fp32["weight_bytes"]
    r = _kiln("run", str(out), "--prompt", "What is the capital of France?", "--max-tokens", "24")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stdout + r.stderr
