"""The collectives of a tensor-parallel rank at run time: what the library's `kiln.all_reduce(x, out)` and
`kiln.all_gather(x, out)` calls do (targets/common/relax_rules.py lowers the IR's `all_reduce` and
`all_gather` to them; `out` of a gather is [ranks, *x.shape], rank-major).

Two backends, one per kind of device, with the same contract (every rank calls the same collectives in
the same order, as the ranks' programs do; sums are identical on every rank):

- `Nccl` (GPUs): NCCL itself, loaded with ctypes from where the CUDA stack installed it, issued on the
  stream TVM runs the kernels on, so a decode step captured as a CUDA graph captures its collectives too.
  Float32 sums up to 1 MB (a decode step's) go through a one-shot kernel over peer memory instead
  (runtime/p2p_allreduce.py) when every rank could set it up. NVLink multicast (NVLS) is off unless
  NCCL_NVLS_ENABLE is set: it can take a host's GPUs out of service.
- `SharedMemory` (CPU processes): each rank writes its part into its slot of one shared file, and after a
  barrier every rank sums the slots in rank order (so every rank gets the same bits), chunk by chunk.

`RankGroup` (runtime/rank_group.py) makes the backend of every process of the group; `abort()` (from its
watchdog, when a rank died) makes a collective that waits for the dead rank fail instead of hang.
"""

from __future__ import annotations

import ctypes
import glob
import mmap
import os
import sys
from typing import Any

import numpy as np

_NCCL_TYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6,
               "float32": 7, "float64": 8, "bfloat16": 9}  # fmt: skip
_STATE: dict[str, Any] = {}


class CollectiveError(RuntimeError):
    """A collective failed (a rank died, NCCL reported an error): the rank group cannot go on."""


class Collectives:
    """One rank's side of the group's collectives; `install()` makes it what the library calls."""

    ranks: int
    rank: int

    def all_reduce(self, x: Any, out: Any) -> None:
        raise NotImplementedError

    def all_gather(self, x: Any, out: Any) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Make collectives waiting for other ranks fail now (called from another thread)."""

    def close(self) -> None:
        pass

    def uninstall(self) -> None:
        if _STATE.get("installed") is self:
            del _STATE["installed"]

    def install(self) -> None:
        """Make this rank's collectives what the library's calls reach (one group per process)."""
        register()
        _STATE["installed"] = self


def _installed() -> Collectives:
    c = _STATE.get("installed")
    if c is None:
        raise CollectiveError(
            "this library calls collectives, but no tensor-parallel group is connected in this process: open the "
            "artifact's top directory with Engine, which starts every rank"
        )
    return c


def register() -> None:
    """Register `kiln.all_reduce` / `kiln.all_gather` (before a tensor-parallel library's VM is made: the VM
    looks its functions up once); they call the collectives installed in this process."""
    if _STATE.get("registered"):
        return
    import tvm_ffi

    tvm_ffi.register_global_func("kiln.all_reduce", lambda x, out: _installed().all_reduce(x, out), override=True)
    tvm_ffi.register_global_func("kiln.all_gather", lambda x, out: _installed().all_gather(x, out), override=True)
    _STATE["registered"] = True


# -- CPU processes: shared memory -------------------------------------------------------------------


class SharedMemory(Collectives):
    """Ranks on one host's CPU, sharing the file at `path`: a header of one arrival counter per rank and an
    abort word, then a slot of `chunk` bytes per rank. A barrier is every rank publishing its count of
    barriers passed and waiting until all have (x86 keeps stores in order, so a slot written before the
    counter is seen whole)."""

    CHUNK = 1 << 22
    HEADER = 4096

    def __init__(self, ranks: int, rank: int, path: str, chunk: int = CHUNK) -> None:
        self.ranks, self.rank, self.path, self.chunk = ranks, rank, path, chunk
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), self.HEADER + ranks * chunk)
        self.counts = np.frombuffer(self.map, dtype=np.int64, count=ranks)
        self.aborted = np.frombuffer(self.map, dtype=np.int64, count=1, offset=8 * ranks)
        self.slots = np.frombuffer(self.map, dtype=np.uint8, offset=self.HEADER).reshape(ranks, chunk)
        self.passed = 0

    @classmethod
    def create(cls, ranks: int, chunk: int = CHUNK) -> str:
        """The shared file of a new group (the leader makes it, and removes it when the group closes)."""
        import tempfile

        fd, path = tempfile.mkstemp(prefix="kiln-ranks-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.ftruncate(fd, cls.HEADER + ranks * chunk)
        os.close(fd)
        return path

    def _wait(self) -> None:
        import time

        self.passed += 1
        self.counts[self.rank] = self.passed
        spins = 0
        while int(self.counts.min()) < self.passed:
            if self.aborted[0]:
                raise CollectiveError("the rank group was aborted: another rank stopped")
            spins += 1
            if spins > 1000:
                time.sleep(2e-5 if spins > 20000 else 0)

    def _exchange(self, x: Any, body: Any) -> None:
        src = np.from_dlpack(x).reshape(-1).view(np.uint8)
        item = np.dtype(str(x.dtype)).itemsize
        step = self.chunk // item * item
        for lo in range(0, max(src.size, 1), step):
            n = min(step, src.size - lo)
            self.slots[self.rank, :n] = src[lo : lo + n]
            self._wait()  # every rank's part is in its slot
            body(lo, n)
            self._wait()  # every rank has read: the slots may be written again

    def all_reduce(self, x: Any, out: Any) -> None:
        dt = np.dtype(str(x.dtype))
        dst = np.from_dlpack(out).reshape(-1).view(np.uint8)

        def body(lo: int, n: int) -> None:
            acc = self.slots[0, :n].view(dt).copy()
            for r in range(1, self.ranks):  # rank order: the same bits on every rank
                acc += self.slots[r, :n].view(dt)
            dst[lo : lo + n] = acc.view(np.uint8)

        self._exchange(x, body)

    def all_gather(self, x: Any, out: Any) -> None:
        dst = np.from_dlpack(out).reshape(self.ranks, -1).view(np.uint8)

        def body(lo: int, n: int) -> None:
            dst[:, lo : lo + n] = self.slots[:, :n]

        self._exchange(x, body)

    def abort(self) -> None:
        self.aborted[0] = 1

    def close(self) -> None:
        self.uninstall()
        del self.counts, self.aborted, self.slots
        self.map.close()


# -- GPUs: NCCL -------------------------------------------------------------------------------------


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * 128)]


def nccl_library() -> ctypes.CDLL:
    """libnccl: KILN_NCCL, else the one the Python environment's CUDA packages install (nvidia/nccl/lib,
    beside torch's), else the system's."""
    if "nccl" in _STATE:
        return _STATE["nccl"]
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before NCCL reads its environment
    cands = [os.environ["KILN_NCCL"]] if os.environ.get("KILN_NCCL") else []
    for d in sys.path:
        cands += sorted(glob.glob(os.path.join(d, "nvidia", "nccl", "lib", "libnccl.so*")))
    cands += ["libnccl.so.2", "libnccl.so"]
    for c in cands:
        try:
            lib = ctypes.CDLL(c, ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        p, i, z = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.ncclCommInitRank.argtypes = [ctypes.POINTER(p), i, _UniqueId, i]
        lib.ncclAllReduce.argtypes = [p, p, z, i, i, p, p]
        lib.ncclAllGather.argtypes = [p, p, z, i, p, p]
        lib.ncclCommAbort.argtypes = [p]
        lib.ncclCommDestroy.argtypes = [p]
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        _STATE["nccl"] = lib
        return lib
    raise CollectiveError(
        "a tensor-parallel cuda artifact needs NCCL (libnccl.so.2), which was not found: install the CUDA "
        "stack's NCCL (the nvidia-nccl package, which torch's CUDA builds bring), or set KILN_NCCL to the library"
    )


def nccl_unique_id() -> bytes:
    """The group's id, made by rank 0 and handed to every rank before they connect."""
    uid = _UniqueId()
    _check(nccl_library().ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
    return bytes(uid.internal)


def _check(err: int, what: str) -> None:
    if err:
        why = nccl_library().ncclGetErrorString(err).decode()
        raise CollectiveError(f"{what} failed: NCCL error {err} ({why})")


class Nccl(Collectives):
    """Rank `rank` of `ranks` on TVM device `device` (its GPU, current in the calling thread). Connecting
    blocks until every rank has called it."""

    def __init__(self, ranks: int, rank: int, unique_id: bytes, device: Any, arch: str | None = None) -> None:
        from .cuda import set_device

        self.ranks, self.rank, self.device = ranks, rank, device
        self.lib = nccl_library()
        set_device(device.index)  # NCCL binds the communicator to the calling thread's current GPU
        uid = _UniqueId()
        uid.internal = unique_id
        self.comm = ctypes.c_void_p()
        _check(self.lib.ncclCommInitRank(ctypes.byref(self.comm), ranks, uid, rank), "ncclCommInitRank")
        self.aborted = False
        # a measurement knob: skip the exchanges (every result is wrong) to time a step without them
        self.dry = os.environ.get("KILN_TP_DRY_COLLECTIVES") == "1"
        self.p2p: Any = None  # the peer-memory all-reduce (runtime/p2p_allreduce.py), where every rank has it
        if arch and os.environ.get("KILN_TP_ALLREDUCE", "p2p") != "nccl":
            self.p2p = self._peer_memory(arch)

    def _agree(self, ok: bool) -> bool:
        """True when every rank says `ok` (an NCCL sum at start, outside any graph)."""
        import tvm

        x = tvm.runtime.tensor(np.array([1 if ok else 0], dtype=np.int32), self.device)
        out = tvm.runtime.tensor(np.zeros(1, dtype=np.int32), self.device)
        _check(
            self.lib.ncclAllReduce(x.data_ptr(), out.data_ptr(), 1, 2, 0, self.comm, self._stream()), "ncclAllReduce"
        )
        self.device.sync()
        return int(out.numpy()[0]) == self.ranks

    def _peer_memory(self, arch: str) -> Any:
        """Set up the peer-memory all-reduce with the other ranks, or None (then NCCL sums everything)."""
        import tvm

        from .cuda import peer_access
        from .p2p_allreduce import CAP, library

        self.p2p_cap = CAP
        lib, handle = None, ctypes.create_string_buffer(64)
        try:
            lib = library(arch)
            ok = all(peer_access(self.device.index, r) for r in range(self.ranks) if r != self.rank)
            ok = ok and lib.kiln_ar_handle_bytes() == 64
            ok = (
                ok
                and lib.kiln_ar_alloc(self.device.index, self.rank, self.ranks, ctypes.cast(handle, ctypes.c_void_p))
                == 0
            )
        except Exception as e:  # no nvcc, no peer access, a CUDA error: this rank says no, and all use NCCL
            print(f"kiln: rank {self.rank}: NCCL sums everything ({e})", file=sys.stderr)
            ok = False
        if not self._agree(ok):
            if lib is not None:
                lib.kiln_ar_close()
            return None
        mine = tvm.runtime.tensor(np.frombuffer(handle.raw, dtype=np.uint8).copy(), self.device)
        every = tvm.runtime.tensor(np.zeros((self.ranks, 64), dtype=np.uint8), self.device)
        _check(
            self.lib.ncclAllGather(mine.data_ptr(), every.data_ptr(), 64, 1, self.comm, self._stream()), "ncclAllGather"
        )
        self.device.sync()
        handles = ctypes.create_string_buffer(every.numpy().tobytes(), self.ranks * 64)
        assert lib is not None  # every rank, this one too, loaded it
        opened = lib.kiln_ar_open(ctypes.cast(handles, ctypes.c_void_p)) == 0
        if not self._agree(opened):
            lib.kiln_ar_close()
            return None
        return lib

    def _stream(self) -> ctypes.c_void_p:
        import tvm_ffi

        return ctypes.c_void_p(tvm_ffi.get_raw_stream(self.device))

    def all_reduce(self, x: Any, out: Any) -> None:
        if self.dry:
            return
        n, dt = int(np.prod([int(d) for d in x.shape])), _NCCL_TYPES[str(x.dtype)]
        if self.p2p is not None and dt == 7 and 0 < n * 4 <= self.p2p_cap:
            err = self.p2p.kiln_ar_run(x.data_ptr(), out.data_ptr(), n, self._stream())
            if err:
                raise CollectiveError(f"the peer-memory all-reduce failed: CUDA error {err}")
            return
        _check(
            self.lib.ncclAllReduce(x.data_ptr(), out.data_ptr(), n, dt, 0, self.comm, self._stream()), "ncclAllReduce"
        )

    def all_gather(self, x: Any, out: Any) -> None:
        if self.dry:
            return
        n, dt = int(np.prod([int(d) for d in x.shape])), _NCCL_TYPES[str(x.dtype)]
        _check(self.lib.ncclAllGather(x.data_ptr(), out.data_ptr(), n, dt, self.comm, self._stream()), "ncclAllGather")

    def abort(self) -> None:
        if self.p2p is not None:
            self.p2p.kiln_ar_abort()  # its kernel stops waiting for the dead rank
        if not self.aborted:
            self.aborted = True
            self.lib.ncclCommAbort(self.comm)  # kernels waiting for a dead rank see the flag and return

    def close(self) -> None:
        self.uninstall()
        if self.p2p is not None:
            self.device.sync()
            self.p2p.kiln_ar_close()
            self.p2p = None
        if not self.aborted:
            self.aborted = True
            self.lib.ncclCommDestroy(self.comm)
