"""Compiled CPU artifacts against transformers: prefill logits and greedy generation, four families."""

import pytest
import torch
from conftest import FAMILIES, hf_greedy, rel_err

from kiln.runtime.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3], list(range(20, 45)), [42]]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(family, engines, models):
    eng = engines[family]
    for n in (1, 7, 19):
        ids = torch.randint(0, 97, (1, n))
        pages = eng.pool.alloc(eng.pool.pages_for(n))
        try:
            logits = eng.prefill(ids[0].tolist(), pages)
        finally:
            eng.pool.release(pages)
        with torch.no_grad():
            ref = models[family](input_ids=ids, use_cache=False).logits[0, -1]
        assert rel_err(logits, ref) < 1e-4, (family, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_generation_equals_transformers(family, engines, models):
    outs = engines[family].generate(PROMPTS, SamplingParams(max_tokens=32, ignore_eos=True))
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == hf_greedy(models[family], p, 32), (family, p)
        assert o.finish_reason == "length"


def test_streaming_sees_every_token_in_order(engines):
    seen: dict[int, list[int]] = {}
    outs = engines["llama"].generate(
        PROMPTS[:2],
        SamplingParams(max_tokens=5, ignore_eos=True),
        stream=lambda i, t: seen.setdefault(i, []).append(t),
    )
    assert seen == {0: outs[0].token_ids, 1: outs[1].token_ids}


def test_stop_tokens_and_seeded_sampling(engines):
    eng = engines["qwen2"]
    greedy = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    stop = greedy[3]
    out = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=8, stop_token_ids=(stop,), ignore_eos=True))[0]
    assert out.token_ids == greedy[: greedy.index(stop) + 1] and out.finish_reason == "stop"
    p = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
    a = eng.generate([PROMPTS[0]], p)[0].token_ids
    b = eng.generate([PROMPTS[0]], p)[0].token_ids
    c = eng.generate([PROMPTS[0]], SamplingParams(**{**p.__dict__, "seed": 8}))[0].token_ids
    assert a == b and a != c


def test_pages_are_returned_after_generation(engines):
    eng = engines["gpt2"]
    free = len(eng.pool.free)
    eng.generate(PROMPTS, SamplingParams(max_tokens=4))
    assert len(eng.pool.free) == free


def test_bad_requests_are_refused_cleanly(engines):
    eng = engines["llama"]
    free = len(eng.pool.free)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate([[1, 2], []])
    with pytest.raises(ValueError, match="artifact supports 256"):
        eng.generate([[1 + i % 96 for i in range(250)]], SamplingParams(max_tokens=10))  # ids in the vocabulary
    with pytest.raises(ValueError, match="outside the vocab"):
        eng.generate([list(range(250))], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="top_p must be in"):
        eng.generate([[1]], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="KV pages"):
        eng.generate([[1] * 200] * 20, SamplingParams(max_tokens=50))
    assert len(eng.pool.free) == free
    assert eng.generate([[3, 4]], SamplingParams(max_tokens=2))[0].token_ids  # still serving


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_verify_entry_point_gives_every_tokens_logits(family, engines, models):
    eng = engines[family]
    ids = torch.randint(0, 97, (2, 6))
    pages = [eng.pool.alloc(1), eng.pool.alloc(1)]
    try:
        out = eng.verify(ids.tolist(), [list(range(6))] * 2, pages)
    finally:
        for p in pages:
            eng.pool.release(p)
    with torch.no_grad():
        ref = models[family](input_ids=ids, use_cache=False).logits
    assert out.shape == tuple(ref.shape) and rel_err(out, ref) < 1e-4
