"""Serving runtime: scheduling policies, prefix caching, preemption, speculative decoding, request handling.

Every output check compares against running the request alone with `Engine.generate([prompt])`."""

import threading

import numpy as np
import pytest
from chisq import chi2, critical

import kiln
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.serving import POLICIES, RequestFailed, Server
from kiln.runtime.speculative import _S, SpeculativeDecoder, Speculator, probs


def _alone(eng, prompts, params):
    return [eng.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]


def _workload(n, seed, max_prompt=120, max_new=40):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 97, size=int(k)).tolist() for k in rng.integers(1, max_prompt, size=n)]
    params = [SamplingParams(max_tokens=int(m), ignore_eos=True) for m in rng.integers(1, max_new, size=n)]
    return prompts, params


def _no_leak(srv):
    assert srv.kv.used == 0 and all(r == 0 for r in srv.kv.ref)


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_give_each_request_its_solo_greedy_output(policy, engines):
    eng = engines["llama"]
    prompts, params = _workload(10, 0)
    prompts[3] = list(range(1, 97)) + list(range(1, 40))  # 135 tokens: > prefill_chunk, several chunks
    ref = _alone(eng, prompts, params)
    srv = Server(eng, policy=policy, max_batch=4, prefill_chunk=32, background=False)
    outs = srv.generate(prompts, params)
    assert [o.token_ids for o in outs] == ref
    assert all(o.finish_reason == "length" for o in outs)
    m = srv.metrics()
    assert m["requests_finished"] == 10 and m["output_tokens"] == sum(p.max_tokens for p in params)
    assert m["peak_batch"] == 4 and m["ttft_p99_s"] > 0 and m["tokens_per_s"] > 0
    _no_leak(srv)
    srv.close()
    assert len(eng.pool.free) == eng.pool.num_pages  # cached pages go back to the engine on close


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_continuous_batching_other_families(family, engines):
    eng = engines[family]  # mistral: sliding window across chunk boundaries; gpt2: learned positions
    prompts, params = _workload(6, 1)
    with Server(eng, max_batch=3, prefill_chunk=16, background=False) as srv:
        assert [o.token_ids for o in srv.generate(prompts, params)] == _alone(eng, prompts, params)


def test_prefix_cache_hits_and_copy_on_write_keep_outputs(engines):
    eng = engines["qwen2"]
    system = list(range(3, 53))  # 50 shared tokens: 3 full pages of 16
    prompts = [system + [60 + i, 70 + i, 80] for i in range(5)]
    prompts.append(system[:48])  # exactly 3 full cached pages: the last token is recomputed into a copied page
    prompts.append(system + [60, 70, 80])  # a repeat of the first request
    params = [SamplingParams(max_tokens=12, ignore_eos=True)] * len(prompts)
    ref = _alone(eng, prompts, params)
    for policy in ("continuous", "static"):
        srv = Server(eng, policy=policy, max_batch=3, prefill_chunk=24, background=False)
        assert [o.token_ids for o in srv.generate(prompts, params)] == ref, policy
        m = srv.metrics()
        assert m["prefix_hit_tokens"] >= 6 * 48 and m["cow_copies"] >= 1, m
        assert m["pages_cached"] >= 3 and m["prefix_hit_rate"] > 0.5
        _no_leak(srv)
        srv.close()
    off = Server(eng, background=False, prefix_caching=False)
    assert [o.token_ids for o in off.generate(prompts, params)] == ref
    assert off.metrics()["prefix_hit_tokens"] == 0
    off.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_preemption_under_a_tiny_page_pool_keeps_outputs(policy, artifacts, engines):
    small = kiln.load(artifacts["llama"], kv_cache_tokens=96)  # 6 pages of 16 positions
    prompts, params = _workload(8, 2, max_prompt=40, max_new=40)
    ref = _alone(engines["llama"], prompts, params)
    srv = Server(small, policy=policy, max_batch=4, prefill_chunk=16, background=False, prefix_caching=False)
    assert [o.token_ids for o in srv.generate(prompts, params)] == ref
    m = srv.metrics()
    assert m["preemptions"] > 0 and m["pages_peak_used"] <= 6, m
    _no_leak(srv)
    srv.close()


def test_speculative_greedy_is_exact(engines):
    target, draft = engines["llama"], engines["qwen2"]  # unrelated random models: acceptance is low
    prompts, params = _workload(6, 3, max_new=30)
    ref = _alone(target, prompts, params)
    with Server(target, draft=draft, max_batch=3, prefill_chunk=32, background=False) as srv:
        assert [o.token_ids for o in srv.generate(prompts, params)] == ref
        m = srv.metrics()
        assert m["spec_proposed"] > 0 and m["acceptance_rate"] < 0.9
    # the target drafting for itself: every proposal is accepted and k grows to its maximum
    sd = SpeculativeDecoder(target, target, k=2, k_max=6)
    for p, sp, r in zip(prompts, params, ref):
        assert sd.generate(p, sp).token_ids == r
    assert sd.stats()["acceptance_rate"] == 1.0 and sd.stats()["spec_k"] == 6
    with Server(target, draft=target, max_batch=3, background=False) as srv:
        assert [o.token_ids for o in srv.generate(prompts, params)] == ref
        assert srv.metrics()["acceptance_rate"] == 1.0


def test_speculative_sampling_keeps_the_target_distribution(engines):
    """One position, 4000 draws of the first token a speculative step emits, against the target's softmax
    (chi-square at p < 1e-4); the draft's own distribution must fail the same test (the test has power)."""
    target, draft = engines["llama"], engines["qwen2"]
    sp = SamplingParams(max_tokens=8, temperature=1.5)
    prompt = [5, 17, 33, 2, 91, 40, 8]
    L, B, R, k = len(prompt), 100, 40, 3
    spec = Speculator(target, draft, k=k, adaptive=False)
    seqs = [
        _S(list(prompt), target.pool.alloc(1), sp, np.random.default_rng(1000 + i), draft.pool.alloc(1), 0)
        for i in range(B)
    ]
    try:
        for s in seqs:
            target.prefill(prompt[:-1], s.pages)
        p = probs(target.prefill(prompt, seqs[0].pages), sp)
        q = probs(draft.prefill(prompt, seqs[0].dpages), sp)
        target.prefill(prompt[:-1], seqs[0].pages)
        draft.prefill(prompt[:-1], seqs[0].dpages)
        seqs[0].dcomputed = 0
        counts = np.zeros(p.shape[0])
        for _ in range(R):
            for s, new in zip(seqs, spec.step(seqs, k)):
                counts[new[0]] += 1
                s.ids, s.dcomputed = list(prompt), min(s.dcomputed, L - 1)
    finally:
        for s in seqs:
            target.pool.release(s.pages)
            draft.pool.release(s.dpages)
    assert counts.sum() == B * R  # one sampled token per sequence and step: the counts chi2 tests

    stat, df = chi2(counts, p)
    assert stat < critical(df), (stat, df)
    stat_q, df_q = chi2(counts, q)
    assert stat_q > critical(df_q), "the draft's distribution is too close to the target's for this test"
    assert 0.05 < spec.stats()["acceptance_rate"] < 0.95  # both the accept and the residual paths ran


def test_refusals_at_submit(artifacts, engines):
    eng = engines["llama"]
    small = kiln.load(artifacts["llama"], kv_cache_tokens=96)
    with Server(eng, background=False) as srv, Server(small, background=False) as tiny:
        with pytest.raises(ValueError, match="artifact supports 256"):
            srv.submit(list(range(1, 97)) * 2 + [1] * 50, SamplingParams(max_tokens=20))
        with pytest.raises(ValueError, match="whole pool has 6"):
            tiny.submit([1] * 90, SamplingParams(max_tokens=20))
        with pytest.raises(ValueError, match="top_p must be in"):
            srv.submit([1, 2], SamplingParams(top_p=0.0))
        with pytest.raises(ValueError, match="max_tokens must be"):
            srv.submit([1, 2], SamplingParams(max_tokens=0))
        with pytest.raises(ValueError, match="empty"):
            srv.submit([], SamplingParams())
        assert srv.metrics()["requests_waiting"] == 0
        assert srv.generate([[3, 4]], SamplingParams(max_tokens=2))[0].token_ids  # still serving
    with pytest.raises(ValueError, match="unknown policy"):
        Server(eng, policy="fifo")


def test_cancel_failing_callback_and_concurrent_submits(engines):
    eng = engines["gpt2"]
    prompts, params = _workload(12, 4)
    ref = _alone(eng, prompts, params)
    with Server(eng, max_batch=4, prefill_chunk=16) as srv:  # background scheduler thread
        # cancellation: stop a long request after its first tokens
        h = srv.submit([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        it = iter(h)
        first = [next(it), next(it)]
        h.cancel()
        c = h.result(timeout=30)
        assert c.finish_reason == "cancelled" and c.token_ids[:2] == first and len(c.token_ids) < 200

        # a stream callback that raises fails only its own request
        seen: list[int] = []

        def bad(tok):
            seen.append(tok)
            if len(seen) == 3:
                raise KeyError("client went away")

        hb = srv.submit([7, 8, 9], SamplingParams(max_tokens=20, ignore_eos=True), callback=bad)
        ok = srv.submit(prompts[0], params[0], callback=lambda t: None)
        with pytest.raises(RequestFailed, match="client went away"):
            hb.result(timeout=30)
        assert ok.result(timeout=30).token_ids == ref[0]

        # several threads submitting at once; tokens also stream through the iterator
        results, streamed = {}, {}

        def worker(idx):
            for i in idx:
                hh = srv.submit(prompts[i], params[i])
                streamed[i] = list(hh)
                results[i] = hh.result(timeout=60).token_ids

        threads = [threading.Thread(target=worker, args=(range(j, 12, 4),)) for j in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [results[i] for i in range(12)] == ref and [streamed[i] for i in range(12)] == ref
        m = srv.metrics()
        assert m["requests_failed"] == 1 and m["requests_cancelled"] == 1 and m["requests_finished"] == 13
    _no_leak(srv)


def test_device_drawn_tokens_reach_clients_while_the_next_step_runs(engines, monkeypatch):
    """With tokens drawn on the device (emulated: the argmax of the host's logits, as the cuda kernel draws it
    at temperature 0), a token's client-side handling runs while the next decode step runs (`while_running`).
    Outputs, streamed tokens and their order, a stop token and a callback that raises behave as without it."""
    from dataclasses import replace

    from kiln.runtime.engine import DecodeStep

    eng = engines["llama"]
    prompts, params = _workload(8, 5, max_new=30)
    params = [replace(sp, max_tokens=max(sp.max_tokens, 6)) for sp in params]
    alone = _alone(eng, prompts, params)
    params[2] = replace(params[2], stop_token_ids=(alone[2][3],), ignore_eos=False)
    ref = _alone(eng, prompts, params)
    assert len(ref[2]) == alone[2].index(alone[2][3]) + 1  # the stop token ends it, and is kept
    real, overlapped = eng.decode, []

    def decode_step(tokens, positions, pages, draws, while_running=None):
        logits = real(tokens, positions, pages)
        if while_running is not None:
            overlapped.append(len(tokens))
            while_running()
        return DecodeStep(
            lambda i: logits[i], [None if d is None else int(np.argmax(logits[i])) for i, d in enumerate(draws)]
        )

    monkeypatch.setattr(eng, "device_sampling", True)
    monkeypatch.setattr(eng, "decode_step", decode_step)
    streamed: dict[int, list[int]] = {i: [] for i in range(len(prompts))}

    def callback(i, tok):
        streamed[i].append(tok)
        if i == 5 and len(streamed[i]) == 4:
            raise RuntimeError("client went away")

    srv = Server(eng, policy="continuous", max_batch=4, background=False)
    handles = [
        srv.submit(p, sp, callback=lambda t, i=i: callback(i, t)) for i, (p, sp) in enumerate(zip(prompts, params))
    ]
    srv._run(handles)
    assert overlapped  # some steps ran with deferred tokens
    for i, h in enumerate(handles):
        if i == 5:
            assert h.completion.finish_reason == "error" and streamed[i] == ref[i][:4]
            continue
        assert h.completion.token_ids == ref[i] and streamed[i] == ref[i], i
        assert h.completion.finish_reason == ("stop" if i == 2 else "length")
    _no_leak(srv)
    srv.close()
