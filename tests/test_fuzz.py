"""Fuzzing with hypothesis, bounded for CI (about a minute): random request streams through a `Server` on
a real tiny artifact, and random valid pipelines against the reference interpreter.

A request stream mixes good prompts with bad ids, bad sampling values, cancels and stream callbacks that
raise (Exception, SystemExit, KeyboardInterrupt). Whatever the mix: nothing crashes or hangs, every bad
request is refused at submit or fails alone, every page comes back, and every good greedy request gives
exactly what the same prompt gives run alone. `bench/soak.py` runs the same kind of stream for minutes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kiln
from kiln import interp
from kiln.errors import PassError
from kiln.passmgr import run_pipeline
from kiln.pipeline import check_pipeline, format_pipeline, parse_pipeline
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.serving import POLICIES, RequestFailed, Server

VOCAB = 97
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

good_prompt = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)
bad_prompt = st.one_of(
    st.just([]),
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8).flatmap(
        lambda p: st.sampled_from([VOCAB, -1, 10**9, 2**63 - 1]).map(lambda b: p + [b])
    ),
)
bad_params = st.sampled_from(
    [
        dict(max_tokens=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_k=-3),
        dict(temperature=math.nan),
        dict(max_tokens=10**6),
    ]
)


@st.composite
def requests(draw):
    kind = draw(st.sampled_from(["greedy", "greedy", "greedy", "sampled", "bad_prompt", "bad_params"]))
    prompt = draw(bad_prompt if kind == "bad_prompt" else good_prompt)
    params = dict(max_tokens=draw(st.integers(1, 12)), ignore_eos=draw(st.booleans()))
    if kind == "sampled":
        params.update(
            temperature=draw(st.floats(0.1, 2.0)), top_k=draw(st.integers(0, 20)), seed=draw(st.integers(0, 9))
        )
    if kind == "bad_params":
        params.update(draw(bad_params))
    fault = draw(st.sampled_from([None, None, None, "cancel", Exception, SystemExit, KeyboardInterrupt]))
    return kind, prompt, params, fault, draw(st.integers(0, 4))


@pytest.fixture(scope="module")
def small(artifacts):
    """A tiny page pool (16 pages of 16 positions) so that streams preempt and evict."""
    return kiln.load(artifacts["llama"], kv_cache_tokens=256)


@FUZZ
@given(
    stream=st.lists(requests(), min_size=1, max_size=10),
    policy=st.sampled_from(POLICIES),
    max_batch=st.integers(1, 6),
    chunk=st.integers(4, 64),
)
def test_random_request_streams(engines, small, stream, policy, max_batch, chunk):
    ref_eng = engines["llama"]
    srv = Server(small, policy=policy, max_batch=max_batch, prefill_chunk=chunk, max_wait_s=0.002)
    try:
        handles = []
        for kind, prompt, params, fault, at in stream:
            cell: list = []  # the handle, once submit returns (a callback may run before that)
            try:
                h = srv.submit(prompt, SamplingParams(**params), callback=_callback(fault, at, cell))
            except ValueError:
                assert kind in ("bad_prompt", "bad_params"), (kind, prompt, params)
                continue
            assert kind != "bad_prompt", prompt
            cell.append(h)
            handles.append((kind, prompt, params, fault, at, h))
        for kind, prompt, params, fault, at, h in handles:
            greedy = kind == "greedy"
            try:
                c = h.result(timeout=60)
            except RequestFailed:
                assert fault in RAISES or math.isnan(params.get("temperature", 0)), (fault, params)
                got = h.completion.token_ids
                assert not greedy or got == _ref(ref_eng, prompt, params)[: len(got)]
                continue
            if fault in RAISES:  # finished before its callback raised
                assert len(c.token_ids) <= at, (len(c.token_ids), at)
            if greedy and fault is None:
                assert c.token_ids == _ref(ref_eng, prompt, params), (prompt, params)
            elif greedy:  # cancelled, or finished before its callback acted: a prefix of the solo run
                assert c.token_ids == _ref(ref_eng, prompt, params)[: len(c.token_ids)]
                assert c.finish_reason in ("cancelled", "stop", "length")
    finally:
        srv.close()
    assert srv.kv.used == 0 and len(small.pool.free) == small.pool.num_pages


RAISES = (Exception, SystemExit, KeyboardInterrupt)


def _callback(fault, at, cell):
    """A stream callback that cancels its request, or raises `fault`, after `at` tokens."""
    if fault is None:
        return None
    seen = [0]

    def cb(tok):
        seen[0] += 1
        if seen[0] > at:
            if fault != "cancel":
                raise fault("fuzz callback")
            if cell:
                cell[0].cancel()

    return cb


REFS: dict = {}


def _ref(eng, prompt, params):
    key = (tuple(prompt), params["max_tokens"], params["ignore_eos"])
    if key not in REFS:
        REFS[key] = eng.generate([prompt], SamplingParams(**params))[0].token_ids
    return REFS[key]


EXACT = ["canonicalize", "fuse-norms", "fuse-rope", "fuse-attention", "fuse-mlp"]


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    family=st.sampled_from(["llama", "gpt2"]),
    passes=st.lists(st.sampled_from(EXACT), min_size=1, max_size=6),
)
def test_random_valid_pipelines_keep_the_numbers(traced, family, passes):
    steps = parse_pipeline(",".join(passes))
    try:
        check_pipeline(steps)
    except PassError:
        assume(False)  # an order the passes declare invalid: refused before running, as it should be
    g, _ = run_pipeline(traced[family], ",".join(passes))
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(len(passes)))
    assert rel_err(interp.run(g, {"input_ids": ids})[0], interp.run(traced[family], {"input_ids": ids})[0]) < 1e-4


@settings(max_examples=300, deadline=None, derandomize=True)
@given(spec=st.text(alphabet="ab-_ ,{}=;.\t01", max_size=30))
def test_pipeline_text_parses_completely_or_is_refused(spec):
    """Any text: refused with PassError, or parsed whole (one step per top-level comma-separated item, and
    the steps survive a round trip). Never another exception, never a skipped item."""
    try:
        steps = parse_pipeline(spec)
    except PassError as e:
        assert "pipeline" in str(e) or "parameter" in str(e)
        return
    depth, items = 0, 1
    for ch in spec:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        items += ch == "," and depth == 0
    assert len(steps) == items
    assert parse_pipeline(format_pipeline(steps)) == steps
