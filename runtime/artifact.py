"""Artifact format: a directory with manifest.json, the compiled library, weights and tokenizer.

Readers check, in order: the manifest parses, its schema version is one this kiln reads, the target
is one this runtime serves and the host can run, and the files are the ones the build wrote
(runtime/integrity.py: the manifest's own checksum, names confined to the directory, every file's size
and SHA-256, the library's before it is opened).

The weights (safetensors: an 8-byte little-endian header length, a JSON header naming each array's
dtype, shape and byte range, then the data) are read by `WeightFile`, each array straight from the file
into a 64-byte-aligned buffer that the runtime hands to TVM without a second copy
(kiln.runtime.tvm_import.host_tensor).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

from .errors import ArtifactError  # defined with the error root; importable from here as before
from .integrity import (
    LIBRARY,
    MANIFEST,
    MANIFEST_SUM,
    PIECES,
    WEIGHTS,
    file_digest,
    member,
    piece_bytes_of,
    sha256_file,
    verify_files,
)
from .tvm_import import ALIGN

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is kilobytes; a huge one is not ours

__all__ = [
    "LIBRARY",
    "MANIFEST",
    "MANIFEST_SUM",
    "SCHEMA_VERSION",
    "WEIGHTS",
    "ArtifactError",
    "WeightFile",
    "check_target",
    "hand_verified_weights_to_loader",
    "host_cpu_flags",
    "read_manifest",
    "sha256_file",
    "verify_files",
]


def read_manifest(path: str) -> dict[str, Any]:
    mf = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        parent, name = os.path.split(os.path.abspath(path))
        olds = [n for n in os.listdir(parent) if n.startswith(name + ".old-")] if os.path.isdir(parent) else []
        hint = f"; an interrupted save left {olds[0]} beside it: save again, or rename it back" if olds else ""
        raise ArtifactError(f"{path} is not an artifact directory (it does not exist or is a file){hint}")
    if not os.path.exists(mf):
        raise ArtifactError(f"{path} has no {MANIFEST}: not a kiln artifact, or an interrupted write")
    if os.path.getsize(member(path, MANIFEST)) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{mf} is larger than {MAX_MANIFEST_BYTES >> 20} MB: not a kiln manifest; rebuild it")
    try:
        with open(mf) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mf} is not valid JSON ({e}); the artifact is corrupt: rebuild it") from e
    if not isinstance(m, dict):
        raise ArtifactError(f"{mf} is not a JSON object; the artifact is corrupt: rebuild it")
    v = m.get("schema_version")
    if not isinstance(v, int):
        raise ArtifactError(f"{mf} has no integer schema_version; the artifact is corrupt: rebuild it")
    if v > SCHEMA_VERSION:
        raise ArtifactError(
            f"artifact schema version {v} is newer than this kiln reads (<= {SCHEMA_VERSION}); "
            "upgrade kiln or rebuild the artifact with this version"
        )
    if v < 1:
        raise ArtifactError(f"artifact schema version {v} is invalid")
    return m


def host_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAG_NAMES = {"sse4.2": "sse4_2"}


def check_target(manifest: dict[str, Any], want: str | None = None) -> None:
    t = manifest.get("target", {})
    name = t.get("name")
    if name == "pim":  # simulated PIM: the program runs functionally on the host CPU
        t, name = t.get("functional", {}), "cpu"
    if want is not None and name != want:
        raise ArtifactError(f"artifact was built for target '{name}', not '{want}': rebuild with --target {want}")
    if name == "cuda":
        return  # the GPU and its architecture are checked when the engine opens the device (runtime/cuda.py)
    if name == "cpu":
        flags = host_cpu_flags()
        if flags:
            missing = [f for f in t.get("requires", []) if _FLAG_NAMES.get(f, f) not in flags]
            if missing:
                raise ArtifactError(
                    f"artifact was built for CPU '{t.get('mcpu')}' and needs {', '.join(missing)}, "
                    "which this CPU lacks: rebuild it on this machine (kiln build ...)"
                )
    else:
        raise ArtifactError(
            f"artifact was built for target '{name}', not 'cpu': this runtime runs cpu, cuda "
            "and simulated pim artifacts; rebuild with --target cpu"
        )


# safetensors dtype names -> numpy's (the ones kiln writes, and their plain neighbours)
_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "I16": "int16",
    "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
PIECE = 8 << 20  # bytes read, then hashed, at a time while verifying the weights (WeightFile.hash_and_read)


class WeightFile:
    """The arrays of a safetensors file, read one by one when asked for (`keys`, `get_tensor`).

    The header is checked whole when the file opens (every range inside the data, every size matching
    its dtype and shape), so a truncated or foreign file is refused before any array is read. Each array
    is read with one copy from the page cache into its 64-byte-aligned place in one buffer for the
    whole file, mapped and faulted in at once (kiln.runtime.tvm_import.aligned_empty), where hundreds of
    separate allocations took a page fault every 4 KB, and that was most of the load's time."""

    def __init__(self, path: str) -> None:
        self.path = path
        name = os.path.basename(path)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                    raise ValueError(f"its header length ({n}) does not fit a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ArtifactError(f"cannot read {name}: {e}; the artifact is corrupt: rebuild it") from e
        if not isinstance(header, dict):
            raise ArtifactError(f"{name}'s header is not a JSON object; the artifact is corrupt: rebuild it")
        header.pop("__metadata__", None)
        self._base, self._data = 8 + n, size - 8 - n
        self._arrays = {k: self._entry(name, k, v) for k, v in header.items()}
        self._slots, end = {}, 0
        for k in sorted(self._arrays, key=lambda k: self._arrays[k][2]):  # in file order
            self._slots[k] = end
            end += -(-self._arrays[k][3] // ALIGN) * ALIGN
        self._arena_bytes = end
        self._arena: Any = None  # allocated on the first read; pages never read cost nothing
        self._loaded: set[str] = set()  # arrays already in the arena (read while hashing: hash_and_keep)
        kept = _kept.pop(os.path.realpath(path), None)
        if kept is not None and kept[0] == _identity(path) and kept[1]._slots == self._slots:
            self._arena, self._loaded = kept[1]._arena, set(self._arrays)

    def _entry(self, file: str, key: str, v: Any) -> tuple[str, tuple[int, ...], int, int]:
        import numpy as np

        try:
            dtype = _DTYPES[v["dtype"]]
            shape = tuple(int(d) for d in v["shape"])
            begin, end = (int(x) for x in v["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(
                f"{file}: array '{key}' has no readable dtype/shape/data_offsets ({e!r}); the artifact is "
                "corrupt: rebuild it"
            ) from e
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= self._data or end - begin != want:
            raise ArtifactError(
                f"{file}: array '{key}' {dtype}{list(shape)} claims bytes {begin}..{end} of {self._data}: the "
                "file is truncated or corrupt; rebuild the artifact"
            )
        return dtype, shape, self._base + begin, want

    def keys(self) -> list[str]:
        return list(self._arrays)

    def get_tensor(self, key: str) -> Any:
        """The array `key` as numpy, read into its 64-byte-aligned place in the file's buffer (asking
        twice reads it again into the same place)."""
        from .tvm_import import aligned_empty

        dtype, shape, offset, nbytes = self._arrays[key]
        if self._arena is None:
            self._arena = aligned_empty((self._arena_bytes,), "uint8")
        raw = self._arena[self._slots[key] : self._slots[key] + nbytes]
        if key in self._loaded:
            self._loaded.discard(key)
            return raw.view(dtype).reshape(shape)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
            view, got = memoryview(raw), 0
            while got < nbytes:  # a raw read may return less than asked
                k = f.readinto(view[got:])
                if not k:
                    raise ArtifactError(f"{os.path.basename(self.path)} ended inside '{key}': rebuild the artifact")
                got += k
        return raw.view(dtype).reshape(shape)

    def hash_and_read(self, algo: str = "sha256") -> str:
        """Read the whole file in order, every array into its place in the arena and everything between
        (header, padding) through a scratch buffer, hashing all of it: the file's digest (`algo`: sha256 or
        blake3, see kiln.runtime.integrity.new_hasher).

        Reading (a copy from the page cache) and hashing (SHA-256) take about as long as each other, so a
        second thread hashes each piece once it is read while this one reads the next: with two cores free
        the pass takes the longer of the two instead of their sum. Pieces of at most PIECE bytes let the
        hasher follow the reader closely through the largest arrays (the embedding is 113 MB)."""
        import queue
        import threading

        from .integrity import new_hasher
        from .tvm_import import aligned_empty

        if self._arena is None:
            self._arena = aligned_empty((self._arena_bytes,), "uint8")
        h, pos, scratch = new_hasher(algo), 0, memoryview(bytearray(1 << 20))
        todo: queue.SimpleQueue[Any] = queue.SimpleQueue()  # pieces read and not yet hashed; None ends it

        def hash_pieces() -> None:
            while (piece := todo.get()) is not None:
                h.update(piece)

        hasher = threading.Thread(target=hash_pieces, name="kiln-hash", daemon=True)
        hasher.start()
        try:
            with open(self.path, "rb", buffering=0) as f:

                def take(view: memoryview, copy: bool = False) -> None:
                    for start in range(0, len(view), PIECE):
                        piece, got = view[start : start + PIECE], 0
                        while got < len(piece):
                            k = f.readinto(piece[got:])
                            if not k:
                                raise ArtifactError(f"{os.path.basename(self.path)} ended early: rebuild the artifact")
                            got += k
                        todo.put(bytes(piece) if copy else piece)  # the scratch buffer is reused: a copy

                for key, (_, _, offset, nbytes) in sorted(self._arrays.items(), key=lambda kv: kv[1][2]):
                    while pos < offset:  # the header, and any bytes between arrays
                        n = min(offset - pos, len(scratch))
                        take(scratch[:n], copy=True)
                        pos += n
                    take(memoryview(self._arena[self._slots[key] : self._slots[key] + nbytes]))
                    pos = max(pos, offset + nbytes)
                while n := f.readinto(scratch):  # anything after the last array
                    todo.put(bytes(scratch[:n]))
        finally:
            todo.put(None)
            hasher.join()
        self._loaded = set(self._arrays)
        return h.hexdigest()

    def hash_pieces_and_read(self, piece: int) -> str:
        """`hash_and_read` for the piecewise SHA-256 (kiln.runtime.integrity.sha256_pieces): each piece of
        the file is read (arrays into their places in the arena, the rest through a scratch buffer) and
        hashed by one thread of a pool, every core reading and hashing at once."""
        import bisect
        from concurrent.futures import ThreadPoolExecutor

        from .integrity import cores, pieces_root
        from .tvm_import import aligned_empty

        if self._arena is None:
            self._arena = aligned_empty((self._arena_bytes,), "uint8")
        # arrays in file order: (first byte in the file, bytes, their place in the arena)
        segs = sorted((off, n, self._slots[k]) for k, (_, _, off, n) in self._arrays.items())
        starts = [s[0] for s in segs]
        size = os.path.getsize(self.path)
        fd = os.open(self.path, os.O_RDONLY)

        def fill(view: memoryview, pos: int) -> None:
            got = 0
            while got < len(view):
                k = os.preadv(fd, [view[got:]], pos + got)
                if not k:
                    raise ArtifactError(f"{os.path.basename(self.path)} ended early: rebuild the artifact")
                got += k

        def one(k: int) -> bytes:
            h, pos, end = hashlib.sha256(), k * piece, min(size, (k + 1) * piece)
            scratch = memoryview(bytearray(1 << 20))
            while pos < end:
                i = bisect.bisect_right(starts, pos) - 1  # the last array starting at or before pos
                if i >= 0 and pos < segs[i][0] + segs[i][1]:  # inside array i: read into the arena
                    off, _, slot = segs[i]
                    stop = min(end, off + segs[i][1])
                    view = memoryview(self._arena[slot + pos - off : slot + stop - off])
                else:  # header or padding, up to the next array
                    stop = min(end, starts[i + 1] if i + 1 < len(starts) else end, pos + len(scratch))
                    view = scratch[: stop - pos]
                fill(view, pos)
                h.update(view)
                pos = stop
            return h.digest()

        try:
            with ThreadPoolExecutor(max(1, min(cores(), 16))) as ex:
                root = pieces_root(list(ex.map(one, range(max(1, -(-size // piece))))))
        finally:
            os.close(fd)
        self._loaded = set(self._arrays)
        return root


# the weights that `hash_and_keep` read and found intact, for the WeightFile that opens them next
_kept: dict[str, tuple[tuple[int, ...], WeightFile]] = {}


def _identity(path: str) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_and_keep(path: str, expected: str, algo: str = "sha256") -> str:
    """The weights file's digest (`algo`), read once into the memory the engine then loads from (kept only when
    it matches `expected`, and only for a file not changed since): hashing and loading were two reads of
    hundreds of MB, and now the bytes loaded are the very bytes checked."""
    _kept.clear()  # at most one file's arrays wait here
    before = _identity(path)
    try:
        wf = WeightFile(path)
        digest = wf.hash_pieces_and_read(piece_bytes_of(algo)) if algo.startswith(PIECES) else wf.hash_and_read(algo)
    except ArtifactError:  # not readable as safetensors: the plain hash reports the mismatch
        return file_digest(path, algo)
    if digest == expected and _identity(path) == before:
        _kept[os.path.realpath(path)] = (before, wf)
    return digest


def hand_verified_weights_to_loader() -> None:
    """From now on, verifying an artifact's weights also reads them for the next WeightFile of that file
    (what `kiln run` and `kiln serve` want: one read instead of two). Off by default, so that a program
    that only verifies (kiln inspect --verify, kiln bundle) does not hold the weights in memory."""
    from .integrity import HASHING_READERS

    HASHING_READERS[WEIGHTS] = hash_and_keep
