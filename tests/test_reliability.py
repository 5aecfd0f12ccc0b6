"""Bad requests at the engine's door and inside the server: refused with a reason, never a crash, and one
bad request never hurts another. Outputs are compared with the same prompt run alone."""

import json
import shutil
import threading

import pytest

import kiln
from kiln.runtime.artifact import ArtifactError
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.serving import RequestFailed, Server

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def _alone(eng, prompt, params=GREEDY):
    return eng.generate([prompt], params)[0].token_ids


def _all_pages_back(srv):
    assert srv.kv.used == 0 and all(r == 0 for r in srv.kv.ref)


# -- 1. no request input crashes the process ------------------------------------------------------------


def test_token_ids_are_range_checked_at_the_door(engines):
    eng = engines["llama"]  # vocab 97
    with Server(eng, background=False) as srv:
        for bad, where in (([1, 97], r"prompt\[1\] is 97"), ([-1, 5], r"prompt\[0\] is -1"), ([10**12], "is 1")):
            with pytest.raises(ValueError, match=where + r".*\[0, 97\)"):
                eng.generate([bad], GREEDY)
            with pytest.raises(ValueError, match=where + r".*\[0, 97\)"):
                srv.submit(bad, GREEDY)
        with pytest.raises(ValueError, match=r"prompt\[2\] is 2.5 \(float\)"):
            srv.submit([1, 2, 2.5], GREEDY)
        assert srv.metrics()["requests_waiting"] == 0
        assert srv.generate([[3, 4, 96]], GREEDY)[0].token_ids == _alone(eng, [3, 4, 96])
    assert len(eng.pool.free) == eng.pool.num_pages


def test_raw_entry_points_check_pages_positions_and_lengths(engines):
    eng = engines["gpt2"]  # learned positions: a position past the table would read outside it
    n = eng.pool.num_pages
    bad_calls = [
        (lambda: eng.prefill([1, 2, 3], [n]), f"names page {n}; the pool has pages 0..{n - 1}"),
        (lambda: eng.prefill([1, 2, 3], [-1]), "names page -1"),
        (lambda: eng.prefill([1, 2, 3], []), "needs 1 pages of 16"),
        (lambda: eng.prefill([1] * 20, [0]), "reaches position 19 and needs 2 pages"),
        (lambda: eng.prefill([1, 200], [0]), r"token id 200 is outside the vocab"),
        (lambda: eng.prefill([1], [0], start=-1), "position -1 is outside"),
        (lambda: eng.decode([5], [256], [list(range(17))]), r"position 256 is outside the artifact's context"),
        (lambda: eng.decode([5, 6], [3], [[0]]), "must have one shape"),
        (lambda: eng.decode([5], [3], [[0], [1]]), "2 page lists for 1 sequences"),
        (lambda: eng.decode([-5], [3], [[0]]), "token id -5"),
        (lambda: eng.verify([[1, 2], [3]], [[0, 1], [0]], [[0], [1]]), "rectangular"),
        (lambda: eng.verify([[1.0, 2.0]], [[0, 1]], [[0]]), "must hold ints"),
        (lambda: eng.verify([[1, 2]], [[0, 1]], [[0, 2**40]]), "names page"),
        (lambda: eng.decode_step([5], [3], [[0]], [None, None]), "2 draws for 1 sequences"),
        (lambda: eng.decode_step([5], [3], [[0]], [(float("nan"), 1)]), r"draws\[0\] is \(nan, 1\)"),
        (lambda: eng.decode_step([5], [3], [[0]], [(-1.0, 1)]), "temperature >= 0, int key"),
        (lambda: eng.decode_step([5], [3], [[0]], [("hot", 1)]), "temperature >= 0, int key"),
    ]
    for call, msg in bad_calls:
        with pytest.raises(ValueError, match=msg):
            call()
    pages = eng.pool.alloc(1)
    try:
        assert eng.prefill([1, 2, 3], pages).shape == (97,)  # still serving
    finally:
        eng.pool.release(pages)


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    mf = dst / "manifest.json"
    m = json.loads(mf.read_text())
    fn(m)
    mf.write_text(json.dumps(m))
    return str(dst)


def test_a_closed_engine_refuses_calls_and_closes_once(artifacts, engines):
    prompt = [5, 9, 13, 2]
    with kiln.load(artifacts["llama"], verify=False) as eng:
        assert _alone(eng, prompt) == _alone(engines["llama"], prompt)
    assert eng.closed and eng.weights == () and eng.caches == ()
    with pytest.raises(ValueError, match="engine is closed; load the artifact again"):
        eng.generate([prompt], GREEDY)
    with pytest.raises(ValueError, match="engine is closed"):
        eng.decode([1], [0], [[0]])
    eng.close()  # a second close is a no-op


def test_edited_shape_facts_are_refused_at_load(artifacts, tmp_path):
    def page_size(m):
        m["kv_cache"]["page_size"] = 32

    def page_size_and_shapes(m):
        page_size(m)
        for t in m["kv_cache"]["tensors"]:
            t["shape"][3] = "32"

    def vocab(m):
        m["model"]["vocab_size"] = 500

    src = artifacts["llama"]
    # verify=False: the cross-checks hold without the checksums (which catch any manifest edit first)
    with pytest.raises(ArtifactError, match="page_size is 32 but cache tensor 'kv_cache_0'.* holds 16"):
        kiln.load(_edit(src, tmp_path / "a", page_size), verify=False)
    with pytest.raises(ArtifactError, match="library refuses the manifest's description.*32 vs. 16"):
        kiln.load(_edit(src, tmp_path / "b", page_size_and_shapes), verify=False)
    with pytest.raises(ArtifactError, match="vocab_size 500 but the library computes 97"):
        kiln.load(_edit(src, tmp_path / "c", vocab), verify=False)
    with pytest.raises(ArtifactError, match="max_context is 0"):
        kiln.load(_edit(src, tmp_path / "d", lambda m: m.update(max_context=0)), verify=False)


def test_threads_calling_generate_at_once_are_serialized(engines):
    eng = engines["qwen2"]
    prompts = [[1 + i, 2, 3 + 2 * i] * (i + 1) for i in range(6)]
    ref = [_alone(eng, p, SamplingParams(max_tokens=12, ignore_eos=True)) for p in prompts]
    outs: dict[int, list[int]] = {}

    def worker(i):
        outs[i] = eng.generate([prompts[i]], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [outs.get(i) for i in range(6)] == ref
    assert len(eng.pool.free) == eng.pool.num_pages


# -- 2. one bad request never hurts another ----------------------------------------------------------------


def _nan_after_submit(srv, prompt):
    """A request whose sampling fails mid-run: its params pass the checks at submit and are then changed
    in place (a caller mutating the frozen object), so the error comes from sampling itself."""
    p = SamplingParams(max_tokens=8, temperature=1.0, seed=0, ignore_eos=True)
    h = srv.submit(prompt, p)
    object.__setattr__(p, "temperature", float("nan"))
    return h


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_a_failing_sample_fails_only_its_request_and_returns_its_pages(policy, engines):
    eng = engines["llama"]
    good = [[5, 6, 7, 8], [9, 10] * 20]
    ref = [_alone(eng, p) for p in good]
    srv = Server(eng, policy=policy, max_batch=4, background=False)
    hs = [srv.submit(good[0], GREEDY), _nan_after_submit(srv, [11, 12, 13]), srv.submit(good[1], GREEDY)]
    srv._run(hs)  # foreground: steps on this thread
    with pytest.raises(RequestFailed, match="NaN"):
        hs[1].result(timeout=1)
    assert [hs[0].result().token_ids, hs[2].result().token_ids] == ref
    _all_pages_back(srv)
    # a decode-time failure too (the prompt's first token sampled fine)
    h = srv.submit([20, 21], SamplingParams(max_tokens=8, temperature=1.0, seed=0, ignore_eos=True))
    other = srv.submit(good[0], GREEDY)
    srv.step()
    assert len(h.completion.token_ids) == 1
    object.__setattr__(next(r for r in srv.running if r.id == h.id).params, "temperature", float("nan"))
    srv._run([h, other])
    with pytest.raises(RequestFailed, match="NaN"):
        h.result(timeout=1)
    assert other.result().token_ids == ref[0]
    _all_pages_back(srv)
    srv.close()


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
def test_a_callback_raising_systemexit_fails_only_its_request(exc, engines):
    eng = engines["gpt2"]
    ref = _alone(eng, [4, 5, 6])
    with Server(eng, max_batch=4) as srv:  # background scheduler thread

        def bad(tok):
            raise exc("client callback")

        hb = srv.submit([7, 8, 9], GREEDY, callback=bad)
        with pytest.raises(RequestFailed, match="client callback"):
            hb.result(timeout=30)
        assert srv.submit([4, 5, 6], GREEDY).result(timeout=30).token_ids == ref  # the scheduler lives on
        assert srv._thread is not None and srv._thread.is_alive()
    _all_pages_back(srv)


def test_a_dead_scheduler_fails_every_request_and_submit_refuses(engines):
    eng = engines["gpt2"]
    srv = Server(eng, max_batch=4)
    waiting = srv.submit([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
    next(iter(waiting))  # it runs

    def die():  # fault injection: the scheduler's own code raises what nothing catches
        raise SystemExit("scheduler bug")

    srv.step = die
    h = srv.submit([4, 5, 6], GREEDY)
    for x in (waiting, h):
        with pytest.raises(RequestFailed, match="scheduler stopped.*scheduler bug"):
            x.result(timeout=30)
    with pytest.raises(RuntimeError, match="scheduler stopped"):
        srv.submit([4, 5, 6], GREEDY)
    srv.close()
    _all_pages_back(srv)


def test_a_request_submitted_during_close_is_refused_not_lost(engines):
    eng = engines["gpt2"]
    started, release = threading.Event(), threading.Event()

    class SlowPrompt(list):  # a prompt whose ids take a while to read: submit is still inside when close() runs
        def __iter__(self):
            started.set()
            release.wait(10)
            return super().__iter__()

    srv = Server(eng)
    got: dict = {}

    def client():
        try:
            got["handle"] = srv.submit(SlowPrompt([1, 2, 3]), GREEDY)
        except RuntimeError as e:
            got["refused"] = e

    t = threading.Thread(target=client)
    t.start()
    assert started.wait(10)
    srv.close()
    release.set()
    t.join(10)
    if "handle" in got:  # accepted: it must finish (cancelled), never hang
        assert got["handle"].result(timeout=10).finish_reason == "cancelled"
    else:
        assert "closed" in str(got["refused"])
    assert "handle" not in got  # submitted after close() began, so it is refused
    assert len(eng.pool.free) == eng.pool.num_pages
