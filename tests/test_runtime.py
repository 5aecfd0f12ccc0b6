"""Runtime pieces that need no model: sampling and the page pool."""

import numpy as np
import pytest

from kiln.runtime.kv_cache import OutOfPages, PagePool, page_table
from kiln.runtime.sampling import SamplingParams, sample


def test_greedy_and_filters():
    logits = np.array([0.0, 3.0, 1.0, 2.9, -5.0], dtype=np.float32)
    assert sample(logits, SamplingParams(), np.random.default_rng(0)) == 1
    rng = np.random.default_rng(0)
    top2 = {sample(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(300)}
    assert top2 == {1, 3}
    rng = np.random.default_rng(0)
    # probabilities: token 1 0.479, token 3 0.433, token 2 0.065, ...
    nucleus = {sample(logits, SamplingParams(temperature=1.0, top_p=0.45), rng) for _ in range(300)}
    assert nucleus == {1}
    nucleus = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(300)}
    assert nucleus == {1, 3}


def test_temperature_sampling_follows_softmax():
    logits = np.array([1.0, 0.0, -1.0, 0.5], dtype=np.float32)
    p = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    rng = np.random.default_rng(123)
    n = 20000
    counts = np.bincount([sample(logits, SamplingParams(temperature=0.7), rng) for _ in range(n)], minlength=4)
    assert np.abs(counts / n - p).max() < 0.015


def test_invalid_params():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_k=-2), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()


def test_page_pool_and_table():
    pool = PagePool(5, 4)
    assert pool.pages_for(1) == 1 and pool.pages_for(8) == 2 and pool.pages_for(9) == 3
    a = pool.alloc(3)
    with pytest.raises(OutOfPages, match="need 3 KV pages, 2 free of 5"):
        pool.alloc(3)
    pool.release(a)
    assert pool.used == 0
    t = page_table([[3, 1], [4]])
    assert t.tolist() == [[3, 1], [4, 0]] and t.dtype == np.int32
