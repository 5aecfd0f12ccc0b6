"""Tensor parallelism at run time: a tensor-parallel build served by one process per rank
(runtime/rank_group.py) against the one-rank build; supervision of the ranks; the collectives on GPUs."""

import pytest
import torch
from conftest import tiny_model

# -- the rank group at run time: one process per rank (runtime/rank_group.py) --------------------------


def _same_as_one_rank(e1, e2, tol: float, max_tokens: int, max_batch: int) -> None:
    """Engine e2 (a multi-rank build) against e1 (the one-rank build of the same weights): prefill logits within
    `tol` of their scale, and the same greedy tokens through generate and the continuous-batching server."""
    import numpy as np

    from kiln.runtime.sampling import SamplingParams
    from kiln.runtime.serving import Server

    ids = [1, 5, 9, 20, 33, 2, 7, 11, 60]
    a, b = e1.prefill(ids, [0, 1, 2]), e2.prefill(ids, [0, 1, 2])
    assert np.abs(a - b).max() < tol * max(1.0, np.abs(a).max())
    prompts = [[1, 2, 3, 4], [9, 8, 7], [5] * 11]
    p = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    want = [c.token_ids for c in e1.generate(prompts, p)]
    assert [c.token_ids for c in e2.generate(prompts, p)] == want
    with Server(e2, policy="continuous", max_batch=max_batch) as srv:
        assert [h.result().token_ids for h in [srv.submit(x, p) for x in prompts]] == want


@pytest.fixture(scope="module")
def tp_artifacts(tmp_path_factory):
    """The same tiny model built for the cpu target on one rank and on two."""
    import kiln

    m = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    out = {}
    for ranks in (1, 2):
        out[ranks] = kiln.compile(m, target="cpu", tensor_parallel=ranks).save(
            str(tmp_path_factory.mktemp(f"tp{ranks}"))
        )
    return out


def test_tensor_parallel_int8_build_matches_one_rank(tmp_path):
    """Quantization composes: an int8 build over two ranks (each keeps its rows' scales) gives the int8 build's
    logits on one rank."""
    import numpy as np

    import kiln
    from kiln.runtime.engine import Engine

    m = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    paths = [kiln.compile(m, quant="int8", tensor_parallel=n).save(str(tmp_path / f"q{n}")) for n in (1, 2)]
    with Engine(paths[0], kv_cache_tokens=128) as e1, Engine(paths[1], kv_cache_tokens=128) as e2:
        a, b = e1.prefill([3, 1, 4, 1, 5, 9, 2, 6], [0, 1]), e2.prefill([3, 1, 4, 1, 5, 9, 2, 6], [0, 1])
        assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())


def test_tensor_parallel_artifact_layout(tp_artifacts):
    """Rank 0 at the top, rank 1 a whole artifact under ranks/1 with half the attention heads; the top
    manifest lists the members and checksums every rank's files."""
    import json
    import os

    top = json.load(open(os.path.join(tp_artifacts[2], "manifest.json")))
    one = json.load(open(os.path.join(tp_artifacts[2], "ranks", "1", "manifest.json")))
    assert top["tensor_parallel"]["members"] == ["", "ranks/1"]
    assert (top["tensor_parallel"]["rank"], one["tensor_parallel"]["rank"]) == (0, 1)
    assert one["pipeline"].endswith("shard-tensor-parallel{ranks=2,rank=1}")
    assert "ranks/1/weights.safetensors" in top["files"]
    assert [lay["heads"] for lay in one["tensor_parallel"]["layers"]] == [[2, 3], [2, 3]]
    from kiln.report import render_report

    assert (
        "- tensor parallel: rank 0 of 2; weights and KV cache above are this rank's share (the other ranks: ranks/1)"
        in (render_report(top))
    )


def test_tensor_parallel_engine_matches_one_rank(tp_artifacts):
    """Two CPU processes exchanging through shared memory give the single-rank build's logits (fp32 sums in
    another order) and the same greedy tokens, through the engine and the continuous-batching server."""
    import numpy as np

    from kiln.runtime.engine import Engine

    with Engine(tp_artifacts[1], kv_cache_tokens=256) as e1, Engine(tp_artifacts[2], kv_cache_tokens=256) as e2:
        assert e2.group is not None and _rank_workers() == [e2.group.procs[0].pid]
        _same_as_one_rank(e1, e2, tol=1e-5, max_tokens=12, max_batch=2)
        a, b = e1.decode([3, 4], [9, 0], [[0, 1, 2], [3]]), e2.decode([3, 4], [9, 0], [[0, 1, 2], [3]])
        assert np.abs(a - b).max() < 1e-5 * max(1.0, np.abs(a).max())
    assert not _rank_workers()  # closing the engine stopped its worker


def test_tensor_parallel_rank_death_fails_calls_with_reason(tp_artifacts):
    """A rank killed while rank 0 waits for it in a collective: the call fails (no hang) naming the rank and
    how it stopped, and so does every later call; closing still works."""
    import os
    import signal
    import threading
    import time

    from kiln.runtime.engine import Engine
    from kiln.runtime.rank_group import RankError

    eng = Engine(tp_artifacts[2], kv_cache_tokens=256)
    pid = eng.group.procs[0].pid
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(RankError, match=rf"rank 1 \(pid {pid}\) stopped with exit code -9"):
        while time.monotonic() - t0 < 60:
            eng.decode([3], [0], [[0]])
    assert time.monotonic() - t0 < 30
    with pytest.raises(RankError, match="restart the server or engine"):
        eng.prefill([1, 2], [0])
    eng.close()
    assert not _rank_workers()


def test_tensor_parallel_rank_death_stops_the_server(tp_artifacts):
    """Under the server, a dead rank fails the requests in flight with the reason, and the server refuses
    new ones saying why (its scheduler stops: the engine cannot run anything any more)."""
    import os
    import signal

    from kiln.runtime.engine import Engine
    from kiln.runtime.sampling import SamplingParams
    from kiln.runtime.serving import Server

    with Engine(tp_artifacts[2], kv_cache_tokens=256) as eng, Server(eng, policy="continuous", max_batch=2) as srv:
        p = SamplingParams(max_tokens=4, ignore_eos=True)
        assert len(srv.submit([1, 2, 3], p).result().token_ids) == 4
        os.kill(eng.group.procs[0].pid, signal.SIGKILL)
        eng.group._watchdog.join(30)  # the watchdog has seen the exit
        with pytest.raises(Exception, match="rank 1 .* stopped with exit code -9"):
            srv.submit([4, 5, 6], p).result()
        srv._thread.join(30)
        with pytest.raises(RuntimeError, match="scheduler stopped .*RankError"):
            srv.submit([7, 8], p)


def test_tensor_parallel_damaged_rank_is_refused_without_hanging(tp_artifacts, tmp_path):
    """A flipped byte in rank 1's weights: the engine refuses to load, naming the file, and leaves no worker."""
    import shutil
    import time

    from kiln.runtime.engine import Engine
    from kiln.runtime.errors import ArtifactError, RankError

    bad = str(tmp_path / "bad")
    shutil.copytree(tp_artifacts[2], bad)
    w = tmp_path / "bad" / "ranks" / "1" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    t0 = time.monotonic()
    with pytest.raises((ArtifactError, RankError), match="ranks/1/weights.safetensors|weights.safetensors"):
        Engine(bad, kv_cache_tokens=64)
    assert time.monotonic() - t0 < 60
    assert not _rank_workers()


def _rank_workers() -> list[int]:
    """Worker processes of this process's rank groups still alive."""
    import os

    out = []
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"kiln.runtime.rank_group" in cmd:
            out.append(int(pid))
    return out


def test_tensor_parallel_refuses_a_member_and_a_weights_dict(tp_artifacts):
    """Rank 1's directory alone is refused (rank 0 starts the group), as is one dict of weights for all ranks."""
    import os

    from kiln.runtime.engine import Engine
    from kiln.runtime.errors import ArtifactError

    with pytest.raises(ArtifactError, match="rank 1 of a 2-rank tensor-parallel artifact: open the artifact's top"):
        Engine(os.path.join(tp_artifacts[2], "ranks", "1"))
    with pytest.raises(ArtifactError, match="weights=FUNCTION"):
        Engine(tp_artifacts[2], weights={})


# -- on 2 GPUs: NCCL between two processes, each rank on its own GPU ------------------------------------


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


def build_cuda_pair(out: str) -> dict[int, str]:
    """tests/cuda_models.py's tiny Llama (8 query heads over 1 KV head: each rank keeps a copy of it) built for
    the cuda target on one rank and on two, with its weights."""
    import os

    paths = {}
    for ranks in (1, 2):
        paths[ranks] = os.path.join(out, f"tiny-tp{ranks}")
        if not os.path.exists(os.path.join(paths[ranks], "manifest.json")):
            from cuda_models import make_model

            import kiln

            kiln.compile(make_model("tiny-llama"), target="cuda", tensor_parallel=ranks).save(paths[ranks])
    return paths


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs")
def test_tensor_parallel_on_two_gpus_matches_one(tmp_path):
    """The 2-rank cuda build (NCCL inside the decode step's CUDA graph) gives the 1-rank build's logits within
    fp16 rounding and the same greedy tokens, through the engine and the server. Artifacts: KILN_CUDA_TP_ARTIFACTS
    (built elsewhere by build_cuda_pair), or built here."""
    import os

    from kiln.runtime.engine import Engine

    paths = build_cuda_pair(os.environ.get("KILN_CUDA_TP_ARTIFACTS") or str(tmp_path))
    with Engine(paths[1], kv_cache_tokens=512) as e1, Engine(paths[2], kv_cache_tokens=512) as e2:
        _same_as_one_rank(e1, e2, tol=2e-2, max_tokens=16, max_batch=4)


def _peer_sum_rank(r, q_in, q_out, res):
    """One process of test_peer_memory_all_reduce_two_processes (spawned)."""
    import ctypes

    from kiln.runtime.p2p_allreduce import library

    torch.cuda.set_device(0)
    lib = library("sm_90a")
    h = ctypes.create_string_buffer(64)
    assert lib.kiln_ar_alloc(0, r, 2, ctypes.cast(h, ctypes.c_void_p)) == 0
    q_out.put((r, h.raw))
    hs = q_in.get()
    assert lib.kiln_ar_open(ctypes.cast(ctypes.create_string_buffer(hs, 128), ctypes.c_void_p)) == 0
    ok = True
    s = torch.cuda.current_stream().cuda_stream
    for n in (1, 4096, 5000, 262144):  # one block, a few, a ragged last block, the 1 MB cap
        x = torch.arange(n, device="cuda", dtype=torch.float32) * (r + 1)
        out = torch.empty_like(x)
        for _ in range(3):
            assert lib.kiln_ar_run(x.data_ptr(), out.data_ptr(), n, ctypes.c_void_p(s)) == 0
            torch.cuda.synchronize()
            ok = ok and torch.equal(out, torch.arange(n, device="cuda", dtype=torch.float32) * 3)
    n, st = 4096, torch.cuda.Stream()
    x, out, g = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda"), torch.cuda.CUDAGraph()
    with torch.cuda.stream(st), torch.cuda.graph(g, stream=st):
        for _ in range(4):  # 4 sums a replay: the epochs advance on the device
            lib.kiln_ar_run(x.data_ptr(), out.data_ptr(), n, ctypes.c_void_p(st.cuda_stream))
    for k in range(3):
        x.fill_(float(k + r))
        g.replay()
        torch.cuda.synchronize()
        ok = ok and bool((out == float(2 * k + 1)).all())
    res.put((r, ok))
    if r == 0:  # rank 1 is gone: this sum waits for it until aborted
        import threading

        threading.Timer(1.0, lib.kiln_ar_abort).start()
        lib.kiln_ar_run(x.data_ptr(), out.data_ptr(), n, ctypes.c_void_p(s))
        torch.cuda.synchronize()
        res.put(("aborted", True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peer_memory_all_reduce_two_processes():
    """The peer-memory all-reduce between two processes on GPU 0 (time-sliced, so correctness only): exact sums
    at 1 to 262,144 floats, replayed in a CUDA graph with new inputs, and a sum whose peer is gone returns once
    aborted instead of hanging."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    qs, back, res = [ctx.Queue() for _ in range(2)], ctx.Queue(), ctx.Queue()
    ps = [ctx.Process(target=_peer_sum_rank, args=(r, qs[r], back, res)) for r in range(2)]
    for p in ps:
        p.start()
    hs = dict(back.get(timeout=300) for _ in range(2))
    for q in qs:
        q.put(hs[0] + hs[1])
    got = dict(res.get(timeout=120) for _ in range(3))
    for p in ps:
        p.join(60)
    assert got == {0: True, 1: True, "aborted": True}
    assert [p.exitcode for p in ps] == [0, 0]


def test_tensor_parallel_artifact_runs_from_a_bundle(tp_artifacts, tmp_path):
    """A bundle carries every rank, and its isolated interpreter (python -I -S, lib/ first) starts the workers
    with its own packages: the bundled 2-rank artifact gives the 1-rank build's logits."""
    import json
    import subprocess
    import sys

    import numpy as np

    from kiln.bundle import make_bundle
    from kiln.runtime.engine import Engine

    b = make_bundle(tp_artifacts[2], str(tmp_path / "b")).path
    code = (
        f"import sys, json; sys.path.insert(0, {str(tmp_path / 'b' / 'lib')!r}); import os; "
        "os.environ['TVM_USE_RUNTIME_LIB'] = '1'; from kiln.runtime.engine import Engine; "
        f"e = Engine({str(tmp_path / 'b' / 'artifact')!r}, kv_cache_tokens=64); "
        "print(json.dumps([e.decode([1, 2], [0, 0], [[0], [1]]).tolist(), e.group.procs[0].args[1:3]])); e.close()"
    )
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=300, cwd=b)
    assert r.returncode == 0, r.stderr
    got, flags = json.loads(r.stdout.strip().splitlines()[-1])
    assert flags == ["-I", "-S"]
    with Engine(tp_artifacts[1], kv_cache_tokens=64) as e1:
        want = e1.decode([1, 2], [0, 0], [[0], [1]])
    assert np.abs(np.array(got) - want).max() < 1e-5 * max(1.0, np.abs(want).max())
