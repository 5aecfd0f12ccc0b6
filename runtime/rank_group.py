"""A tensor-parallel artifact runs as one process per rank: rank 0 is the `Engine` the caller opened, and
ranks 1..N-1 are worker processes it starts, feeds and supervises (`RankGroup`).

Each worker opens its rank's artifact (tensor_parallel.members[R], under rank 0's directory) as an Engine
of its own, on GPU R (or the CPU), and connects its collectives (runtime/collectives.py). Rank 0 then
forwards every entry-point call it makes (`Engine._run`: the function, its host inputs, whether it replays
as a CUDA graph) before running it itself, so all ranks run the same programs in the same order and meet
at their collectives; the host work (scheduling, pages, sampling) is rank 0's alone.

Supervision: a watchdog thread waits on the workers' exits. A worker that dies (or reports an error and
stops) marks the group failed with its reason, and the watchdog aborts rank 0's collectives, so a step
waiting for the dead rank returns instead of hanging; that call and every later one raise `RankError`
with the reason. A worker whose leader is gone exits by itself. Closing the engine stops the workers.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from .errors import RankError


def start_group(path: str, manifest: dict, on_gpu: bool, weights: Any, **options: Any) -> RankGroup:
    """Ranks 1..N-1 of the tensor-parallel artifact at `path`, which must be rank 0's; `weights` (None or a
    function each rank calls for its own shard) and `options` go to every rank's Engine."""
    from .artifact import ArtifactError

    tp = manifest["tensor_parallel"]
    if int(tp.get("rank", 0)) != 0:
        raise ArtifactError(
            f"{path} is rank {tp['rank']} of a {tp['ranks']}-rank tensor-parallel artifact: open the "
            "artifact's top directory (rank 0), which starts every rank"
        )
    if weights is not None and not callable(weights):
        raise ArtifactError(
            "a tensor-parallel artifact built without weights takes weights=FUNCTION (manifest, device) -> "
            "{field: array}, an importable function each rank calls for its own shard, not one dict"
        )
    return RankGroup(path, manifest, on_gpu, dict(options, weights=weights))


def members(path: str, manifest: dict) -> list[str]:
    """Every rank's artifact directory, rank 0 first."""
    from .artifact import MANIFEST, ArtifactError
    from .integrity import member

    tp = manifest["tensor_parallel"]
    got = tp.get("members")
    if not isinstance(got, list) or len(got) != int(tp["ranks"]) or not all(isinstance(m, str) for m in got):
        raise ArtifactError(
            f"{path}: the manifest's tensor_parallel.members does not list {tp['ranks']} rank directories; the "
            "artifact is corrupt or is not rank 0 of its group: open the directory `kiln build` wrote"
        )
    return [path] + [os.path.dirname(member(path, f"{m}/{MANIFEST}")) for m in got[1:]]


class RankGroup:
    """Ranks 1..N-1 of rank 0's tensor-parallel artifact at `path`, started at once (they load while rank 0
    does). `options`: the Engine options every rank shares (kv_cache_tokens, cuda_graphs, ...)."""

    def __init__(self, path: str, manifest: dict, on_gpu: bool, options: dict[str, Any]) -> None:
        self.ranks = int(manifest["tensor_parallel"]["ranks"])
        self.on_gpu = on_gpu
        self.failed: str | None = None
        self.collectives: Any = None
        self._reading = threading.Lock()  # the watchdog and the loading wait both read the workers' messages
        self._shm: str | None = None
        if on_gpu:
            from .collectives import nccl_unique_id

            spec: dict[str, Any] = {"kind": "nccl", "id": nccl_unique_id()}
        else:
            from .collectives import SharedMemory

            self._shm = SharedMemory.create(self.ranks)
            spec = {"kind": "shm", "path": self._shm}
        self.spec = spec
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        env = dict(os.environ)
        if not on_gpu:  # the ranks share the host's cores
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            env["TVM_NUM_THREADS"] = str(max(1, cores // self.ranks))
        try:
            for r, where in enumerate(members(path, manifest)[1:], start=1):
                mine, theirs = socket.socketpair()
                p = subprocess.Popen(
                    _worker_command(theirs.fileno()),
                    pass_fds=[theirs.fileno()],
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
                theirs.close()
                conn = Connection(mine.detach())
                conn.send((where, r, self.ranks, spec, options))
                self.procs.append(p)
                self.conns.append(conn)
        except BaseException:
            self.close()
            raise
        self._stop_r, w = os.pipe()
        self._stop_w: int | None = w
        self._watchdog = threading.Thread(target=self._watch, name="kiln-rank-watchdog", daemon=True)
        self._watchdog.start()

    # -- supervision --------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Wait for a worker to exit (or the group to close); a worker's exit fails the group."""
        sentinels = {os.pidfd_open(p.pid): r for r, p in enumerate(self.procs, start=1)}  # readable at exit
        self._pidfds = list(sentinels)
        while True:
            ready = wait([*sentinels, self._stop_r])
            if self._stop_r in ready:
                return
            for s in ready:
                r = sentinels[s]  # type: ignore[index]
                p = self.procs[r - 1]
                p.wait()
                self.fail(f"rank {r} (pid {p.pid}) stopped with exit code {p.returncode}{self._reason(r)}")
                return

    def _reason(self, r: int) -> str:
        """The error a worker sent before it stopped, if any."""
        conn = self.conns[r - 1]
        with self._reading:
            try:
                while conn.poll(0):
                    msg = conn.recv()
                    if isinstance(msg, tuple) and msg and msg[0] == "error":
                        return f": {msg[1]}"
            except (EOFError, OSError, pickle.UnpicklingError):
                pass
        return ""

    def fail(self, reason: str) -> None:
        """Mark the group failed and unblock rank 0's collectives."""
        if self.failed is None:
            self.failed = reason
        if self.collectives is not None:
            self.collectives.abort()

    def check(self) -> None:
        if self.failed is not None:
            raise RankError(f"the tensor-parallel group failed: {self.failed}; restart the server or engine")

    # -- start --------------------------------------------------------------------------------------
    def connect(self, device: Any, arch: str | None = None) -> Any:
        """Rank 0's collectives, connected to the workers' (which connect as they finish loading)."""
        from .collectives import Nccl, SharedMemory

        if self.spec["kind"] == "shm":
            self.collectives = SharedMemory(self.ranks, 0, self.spec["path"])
        else:
            box: dict[str, Any] = {}

            def init() -> None:
                try:
                    box["c"] = Nccl(self.ranks, 0, self.spec["id"], device, arch)
                except BaseException as e:
                    box["e"] = e

            t = threading.Thread(target=init, name="kiln-nccl-init", daemon=True)
            t.start()
            while t.is_alive() and self.failed is None:  # a worker that dies while loading fails the start
                t.join(0.05)
            self.check()
            if "e" in box:
                raise box["e"]
            self.collectives = box["c"]
        self.collectives.install()
        return self.collectives

    def ready(self, timeout: float = 1800.0) -> None:
        """Wait until every worker has loaded its rank (or one failed)."""
        deadline = time.monotonic() + timeout
        for r, conn in enumerate(self.conns, start=1):
            msg = None
            while msg is None:
                self.check()
                if time.monotonic() > deadline:
                    self.fail(f"rank {r} did not load within {timeout:.0f} s")
                    self.check()
                try:
                    with self._reading:  # the watchdog may take an error message first: then it fails the group
                        msg = conn.recv() if conn.poll(0.05) else None
                except (EOFError, OSError):
                    self._watchdog.join(5)
                    self.check()
                    raise RankError(f"rank {r} closed its connection while loading") from None
            if msg[0] != "ready":
                self.fail(f"rank {r} failed to load: {msg[1]}")
                self.check()

    # -- calls --------------------------------------------------------------------------------------
    def send(self, msg: tuple) -> None:
        """Forward one call to every worker (they run it in order, without answering)."""
        self.check()
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for r, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError as e:
                self.fail(f"rank {r} cannot be reached ({e})")
                self.check()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers (asking first, then killing) and release the collectives."""
        stop = getattr(self, "_stop_w", None)
        if stop is not None:
            os.write(stop, b"x")
            self._watchdog.join(5)
            os.close(stop)
            os.close(self._stop_r)
            self._stop_w = None
            for fd in getattr(self, "_pidfds", []):
                os.close(fd)
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(("close",)))
            except OSError:
                pass
        if self.collectives is not None:  # with the workers' (NCCL may meet its peers on the way out)
            self.collectives.close()
            self.collectives = None
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        if self._shm is not None:
            try:
                os.remove(self._shm)
            except OSError:
                pass
            self._shm = None


def _worker_command(fd: int) -> list[str]:
    """This interpreter with this process's import path and isolation flags (a bundle runs `python -I -S`
    with its own lib/ first; a benchmark's weight function lives beside its script) running `worker(fd)`."""
    flags = [
        f
        for f, on in (("-I", sys.flags.isolated), ("-S", sys.flags.no_site), ("-E", sys.flags.ignore_environment))
        if on
    ]
    path = [p for p in sys.path if p]
    code = f"import sys; sys.path[:0] = {path!r}; from kiln.runtime.rank_group import worker; worker({fd})"
    return [sys.executable, *flags, "-c", code]


def connect_worker(spec: dict, ranks: int, rank: int, device: Any, arch: str | None = None) -> Any:
    """A worker's collectives (the leader made `spec`)."""
    from .collectives import Nccl, SharedMemory

    if spec["kind"] == "shm":
        c: Any = SharedMemory(ranks, rank, spec["path"])
    else:
        c = Nccl(ranks, rank, spec["id"], device, arch)
    c.install()
    return c


def _orphan_guard() -> None:
    """Exit when the leader is gone (its collectives would wait for it forever)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.2)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="kiln-orphan-guard", daemon=True).start()


def worker(fd: int) -> None:
    """A worker's life: open the rank's artifact, say ready, run the calls rank 0 forwards until told to
    close (or rank 0 is gone). An error is sent to rank 0 before the worker stops."""
    _orphan_guard()
    conn = Connection(fd)
    where, rank, ranks, spec, options = conn.recv()
    try:
        from .engine import Engine

        eng = Engine(where, _rank=(rank, ranks, spec), **options)
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None
    conn.send(("ready",))
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(0)  # rank 0 is gone
        if msg[0] == "close":
            break
        try:
            eng._run(*msg[1:])
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))
            os._exit(1)  # a rank out of step cannot go on; rank 0's watchdog fails the group
    eng.close()
