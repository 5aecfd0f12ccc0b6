"""Prompt-lookup speculation: the proposer, exact greedy and sampled outputs, the adaptive policy."""

import numpy as np
import pytest
from chisq import chi2, critical

from kiln.runtime.ngram import NgramSpeculator, propose
from kiln.runtime.sampling import SamplingParams, probs
from kiln.runtime.serving import Server
from kiln.runtime.spec_policy import Acceptance, StepCosts, choose_k, expected_tokens, step_costs
from kiln.runtime.speculative import _S


def test_propose_takes_the_longest_suffix_match():
    # the 3-token suffix [1, 2, 3] occurs at 0 (followed by 9, 9); the 1-token suffix [3] later, by 7
    ids = [1, 2, 3, 9, 9, 5, 3, 7, 8, 1, 2, 3]
    assert propose(ids, 2) == [9, 9]
    assert propose(ids, 2, max_n=1) == [7, 8]  # only 1-grams: the latest earlier 3 is followed by 7, 8
    assert propose([4, 5, 6, 4, 5], 3) == [6, 4, 5]


def test_propose_no_match_no_draft_and_the_k_bound():
    assert propose([1, 2, 3, 4, 5], 4) == []  # the last token never occurred before
    assert propose([7], 4) == [] and propose([1, 1], 0) == []
    ids = list(range(20)) + list(range(10))
    assert propose(ids, 3) == [10, 11, 12]
    assert propose(ids, 50) == list(range(10, 20)) + list(range(10))  # as much as follows, never more than k
    assert len(propose([3] * 30, 5)) == 5
    # the latest occurrence followed by k tokens is preferred to a later one too close to the end
    assert propose([8, 1, 2, 8, 3, 8], 3) == [1, 2, 8]


def test_policy_prefers_plain_decoding_when_drafts_fail():
    costs = StepCosts(1.0, (1.0, 1.1, 1.2, 1.3, 1.4))
    assert choose_k([0.0], [4], costs, 4) == 0
    assert choose_k([0.9], [4], costs, 4) == 4
    assert choose_k([0.9], [0], costs, 4) == 0  # no draft, nothing to verify
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    a = Acceptance()
    for _ in range(30):
        a.update(0, True)
    assert a.rate < 0.05


def test_adaptive_turns_speculation_off_and_on_by_shadow_scoring(engines):
    eng = engines["llama"]
    spec = NgramSpeculator(eng, k_max=4, adaptive=True)
    assert spec.costs is step_costs(eng, 4) and spec.costs.decode > 0  # measured once per engine, cached
    s = _S([1, 2, 3, 1, 2, 3, 1, 2], [], SamplingParams(), np.random.default_rng(0))
    ks = []
    for _ in range(30):  # tokens from {1, 2, 3}: a draft always exists, and the sequence never follows it
        ks.append(spec.step_k([s]))
        d = spec._st(s).draft
        assert d
        s.ids.append(next(x for x in (1, 2, 3) if x != d[0]))
    assert ks[0] > 0 and ks[-10:] == [0] * 10, ks
    assert spec.stats()["spec_plain_steps"] >= 10
    t = _S([5, 6, 7, 8] * 3, [], SamplingParams(), np.random.default_rng(0))
    ks = []
    for _ in range(20):  # a sequence that keeps repeating itself: proposals agree, speculation comes back
        ks.append(spec.step_k([t]))
        t.ids.append(t.ids[-4])
    assert ks[-1] > 0
    spec.release(s)
    spec.release(t)
    assert not spec._state


def _repetitive(n, seed):
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        motif = rng.integers(1, 97, size=int(rng.integers(3, 9))).tolist()
        prompts.append(rng.integers(1, 97, size=5).tolist() + motif * 4 + motif[:2])
    return prompts


@pytest.mark.parametrize("adaptive", [False, True])
def test_ngram_greedy_is_exact_through_generate(engines, adaptive):
    eng = engines["llama"]
    prompts = _repetitive(5, 0)
    sp = SamplingParams(max_tokens=30, ignore_eos=True)
    ref = [eng.generate([p], sp)[0].token_ids for p in prompts]
    with Server(eng, draft="ngram", spec_k=4, spec_adaptive=adaptive, background=False) as srv:
        assert [o.token_ids for o in srv.generate(prompts, sp)] == ref
        m = srv.metrics()
    assert m["spec_proposed"] > 0 and m["spec_accepted"] > 0 and m["tokens_per_verify"] > 1.0, m
    assert [o.token_ids for o in eng.generate(prompts, sp, draft="ngram")] == ref


def test_ngram_greedy_is_exact_in_a_busy_server(engines):
    eng = engines["qwen2"]
    prompts = _repetitive(8, 1)
    params = [SamplingParams(max_tokens=int(m), ignore_eos=True) for m in (25, 7, 40, 12, 33, 3, 19, 28)]
    params[2] = SamplingParams(max_tokens=40, ignore_eos=True, logprobs=2)  # cannot speculate: decoded plainly
    params[4] = SamplingParams(max_tokens=33, ignore_eos=True, repetition_penalty=1.3)
    ref = [eng.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    with Server(eng, draft="ngram", max_batch=3, prefill_chunk=16) as srv:  # background thread, joins mid-flight
        outs = srv.generate(prompts, params)
        m = srv.metrics()
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert [t.token_id for t in outs[2].logprobs] == ref[2].token_ids
    assert m["spec_accepted"] > 0 and m["requests_finished"] == 8
    assert srv.kv.used == 0


def test_ngram_sampling_keeps_the_target_distribution(engines):
    """The first token a verify step emits, 4000 draws, against the target's softmax (chi-square, p < 1e-4).
    The classic mistake (on a rejection, sampling p with the draft token left in) must fail the test."""
    eng = engines["llama"]
    sp = SamplingParams(max_tokens=8, temperature=0.07)  # the tiny model's logits are nearly flat: sharpen them
    head = [5, 17, 33]
    pages = eng.pool.alloc(1)
    try:  # a draft token the target gives a middling probability, so accept and reject paths both run
        best = None
        for t in range(1, 97):
            prompt = head + [t, 60, 61] + head
            p = probs(eng.prefill(prompt, pages), sp)
            if best is None or abs(p[t] - 0.4) < abs(best[2][best[1]] - 0.4):
                best = (prompt, t, p)
    finally:
        eng.pool.release(pages)
    prompt, d, p = best
    assert 0.2 < p[d] < 0.8
    B, R, k = 100, 40, 1
    spec = NgramSpeculator(eng, k=k, adaptive=False)
    seqs = [_S(list(prompt), eng.pool.alloc(1), sp, np.random.default_rng(7000 + i)) for i in range(B)]
    counts = np.zeros(p.shape[0])
    try:
        for s in seqs:
            eng.prefill(prompt[:-1], s.pages)
        for _ in range(R):
            assert spec.step_k(seqs) == k
            for s, new in zip(seqs, spec.step(seqs, k)):
                counts[new[0]] += 1
                s.ids = list(prompt)
    finally:
        for s in seqs:
            eng.pool.release(s.pages)
    assert counts.sum() == B * R  # one sampled token per sequence and step: the counts chi2 tests

    stat, df = chi2(counts, p)
    assert stat < critical(df), (stat, df)
    wrong = p * (1 - p[d])
    wrong[d] += p[d]  # accept with p(d), else sample p again: d gets p + (1-p)p
    stat_w, df_w = chi2(counts, wrong)
    assert stat_w > critical(df_w), "the test cannot tell the biased residual from the right one"
    assert abs(spec.stats()["acceptance_rate"] - p[d]) < 0.05


def test_cli_run_speculate_ngram_keeps_the_output(smol_artifact):
    import json
    import subprocess
    import sys

    def run(*extra):
        args = ["run", smol_artifact, "--prompt", "one two three one two three one two", "--max-tokens", "12"]
        r = subprocess.run([sys.executable, "-m", "kiln.cli", *args, "--no-verify", *extra],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r

    plain = json.loads(run("--json").stdout)
    assert json.loads(run("--json", "--speculate", "ngram").stdout) == plain
    streamed = run("--speculate", "ngram")
    assert "tok/s" in streamed.stderr and "Traceback" not in streamed.stderr
    bad = [sys.executable, "-m", "kiln.cli", "run", smol_artifact, "--prompt", "x", "--speculate", "eagle"]
    r = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "invalid choice: 'eagle'" in r.stderr
