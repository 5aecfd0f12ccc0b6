"""Artifact integrity: what an artifact holds is what its build wrote, before any of it is opened.

An artifact contains native code (model.so runs in the loading process the moment it is opened), so
loading one is running a program. The build records every file's size and SHA-256 in manifest.json and
the manifest's own SHA-256 in manifest.sha256 beside it; a reader checks, in this order:

1. manifest.sha256 matches manifest.json (an edited manifest could otherwise un-list or re-hash a file);
2. every listed name stays inside the artifact: relative, no `..`, no symbolic link on the way, and a
   regular file at the end (a device such as /dev/zero would be hashed forever);
3. every listed file has its size, and nothing the runtime would load (the library, the weights, the
   tokenizer folder) is present without being listed;
4. the digest of the library, then (with `full`) of every other file: BLAKE3 where the manifest records
   it and the blake3 package is installed (`file_entry`, `checked_digest`), else SHA-256.

The checks say that the files are the ones the build wrote, not that the build is trustworthy: an
artifact from someone else is code from someone else.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from typing import Any

from .errors import ArtifactError

MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"
LIBRARY = "model.so"
WEIGHTS = "weights.safetensors"
LOADED_DIRS = ("tokenizer", "kernels")  # folders whose files the runtime opens (kernels: cuda fatbins)
# files at least PIECES_FROM bytes also record a SHA-256 over the SHA-256 of each PIECE_BYTES piece, which
# threads check in parallel (hashlib gives the GIL back): a host without blake3 checks 16 GB of weights
# on all its cores instead of one
PIECE_BYTES = 64 << 20
PIECES_FROM = 256 << 20
PIECES = "sha256_pieces"


def _blake3() -> Any:
    """The blake3 package (a runtime requirement), or None where it is not installed: then SHA-256 alone."""
    try:
        import blake3
    except ImportError:
        return None
    return blake3


def new_hasher(algo: str) -> Any:
    """A fresh hash object: "sha256" (hashlib) or "blake3" (all cores on a large host; one on a small or
    shared one, where more threads only contend)."""
    if algo == "blake3":
        b3 = _blake3()
        return b3.blake3(max_threads=b3.blake3.AUTO if cores() >= 8 else 1)
    return hashlib.sha256()


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pieces_root(digests: list[bytes]) -> str:
    """The piecewise digest recorded in the manifest: SHA-256 over the pieces' SHA-256 digests, in order."""
    return hashlib.sha256(b"".join(digests)).hexdigest()


def piece_bytes_of(algo: str) -> int:
    """The piece size of a piecewise algorithm name, "sha256_pieces:<bytes>"."""
    return int(algo.split(":", 1)[1])


def sha256_pieces(path: str, piece: int = PIECE_BYTES) -> str:
    """The file's piecewise digest (`pieces_root`), the pieces hashed on up to one thread per core."""
    from concurrent.futures import ThreadPoolExecutor

    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:

        def one(k: int) -> bytes:
            h, pos, end = hashlib.sha256(), k * piece, min(size, (k + 1) * piece)
            buf = memoryview(bytearray(min(end - pos, 16 << 20) or 1))
            while pos < end:
                n = os.preadv(fd, [buf[: end - pos]], pos)
                if not n:
                    raise ArtifactError(f"{path} ended early while it was being hashed: rebuild the artifact")
                h.update(buf[:n])
                pos += n
            return h.digest()

        with ThreadPoolExecutor(max(1, min(cores(), 16))) as ex:
            return pieces_root(list(ex.map(one, range(max(1, -(-size // piece))))))
    finally:
        os.close(fd)


def file_digest(path: str, algo: str = "sha256", chunk: int = 1 << 25) -> str:
    """The file's digest, read in large pieces into one reused buffer.

    The loader hashes on a thread while the main thread imports TVM (pure Python, holding the GIL): the
    hashing thread gives the GIL back for every read and every update and then waits up to the switch
    interval (5 ms) to take it again, so few large pieces (32 MB) hash faster than many small ones, and a
    reused buffer spares a fresh allocation and its page faults per piece. `algo`: sha256, blake3, or
    sha256_pieces:<piece bytes> (`sha256_pieces`)."""
    if algo.startswith(PIECES):
        return sha256_pieces(path, piece_bytes_of(algo))
    h = new_hasher(algo)
    buf = memoryview(bytearray(min(chunk, max(os.path.getsize(path), 1))))
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(buf[:n])
    return h.hexdigest()


def sha256_file(path: str) -> str:
    """The file's SHA-256 (what every manifest entry records)."""
    return file_digest(path, "sha256")


def file_entry(path: str) -> dict[str, Any]:
    """A manifest entry for the file: its size, SHA-256 and, where the blake3 package is installed, its
    BLAKE3, which the loader checks instead when it can: a cryptographic hash like SHA-256, and 2.4 times
    less CPU than SHA-256 here (AMD EPYC with SHA instructions, 1.9 against 0.8 GB/s on a loaded core),
    which is what the checksum pass of a cold start costs on a busy host."""
    out: dict[str, Any] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    if _blake3() is not None:
        out["blake3"] = file_digest(path, "blake3")
    if out["bytes"] >= PIECES_FROM:
        out[PIECES] = {"piece_bytes": PIECE_BYTES, "root": sha256_pieces(path, PIECE_BYTES)}
    return out


def checked_digest(meta: dict[str, Any]) -> tuple[str, str]:
    """(algorithm, expected digest) that the loader checks for a manifest entry: BLAKE3 where the entry
    records it and blake3 is installed, else the piecewise SHA-256 of a large file (checked on every core),
    else SHA-256 (entries of older artifacts, hosts without blake3)."""
    if isinstance(meta.get("blake3"), str) and _blake3() is not None:
        return "blake3", meta["blake3"]
    pieces = meta.get(PIECES)
    if isinstance(pieces, dict) and isinstance(pieces.get("root"), str) and isinstance(pieces.get("piece_bytes"), int):
        if pieces["piece_bytes"] >= 1 << 20:  # a tiny piece size would make a huge list of digests
            return f"{PIECES}:{pieces['piece_bytes']}", pieces["root"]
    return "sha256", meta["sha256"]


def manifest_sum_line(manifest_path: str) -> str:
    """The line manifest.sha256 holds (the format `sha256sum -c` reads)."""
    return f"{sha256_file(manifest_path)}  {MANIFEST}\n"


def member(root: str, rel: Any) -> str:
    """The path of listed file `rel` inside artifact `root`, refused unless it is a relative name without
    `..`, reached through no symbolic link, and a regular file."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel or "\0" in rel:
        raise ArtifactError(f"the manifest lists {rel!r}, not a relative file name inside the artifact: rebuild it")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(
            f"the manifest lists {rel!r}, which leaves the artifact directory or is not normal: rebuild it"
        )
    p = root
    for part in parts:
        p = os.path.join(p, part)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise ArtifactError(f"{rel} is missing from {root}: the artifact is incomplete; rebuild it") from None
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(
                f"{rel} is a symbolic link ({os.path.relpath(p, root)}): an artifact holds its own files; "
                "replace the link with the file, or rebuild the artifact"
            )
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{rel} is not a regular file (a device, pipe or folder): rebuild the artifact")
    return p


def _listing(path: str, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path}/{MANIFEST} lists no files; the artifact is corrupt: rebuild it")
    for rel, meta in files.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and isinstance(meta.get("sha256"), str)):
            raise ArtifactError(f"the manifest's entry for {rel!r} has no bytes/sha256: rebuild the artifact")
    return files


def _unlisted(path: str, files: dict[str, Any]) -> list[str]:
    """Files the runtime would open that the manifest does not list."""
    found = [n for n in (LIBRARY, WEIGHTS) if os.path.lexists(os.path.join(path, n))]
    for d in LOADED_DIRS:
        top = os.path.join(path, d)
        if os.path.isdir(top) and not os.path.islink(top):
            for root, dirs, names in os.walk(top):
                found += [os.path.relpath(os.path.join(root, n), path) for n in dirs + names]
    return [n for n in found if n not in files and not any(f.startswith(n + "/") for f in files)]


def check_manifest_sum(path: str) -> None:
    """manifest.sha256 must exist and match manifest.json."""
    sp = os.path.join(path, MANIFEST_SUM)
    if not os.path.isfile(sp) or os.path.islink(sp):
        raise ArtifactError(
            f"{path} has no {MANIFEST_SUM} (the manifest's own checksum): the artifact is from an older kiln "
            "or was altered; rebuild it"
        )
    with open(sp) as f:
        recorded = f.read().split()[:1]
    if recorded != [sha256_file(member(path, MANIFEST))]:
        raise ArtifactError(
            f"{MANIFEST} does not match {MANIFEST_SUM}: the manifest was edited after the build; rebuild the artifact"
        )


def audit(path: str, manifest: dict[str, Any], full: bool = True) -> list[tuple[str, str | None]]:
    """Every check, each as (what, problem or None), for a report that shows all of them (`kiln inspect
    --verify`). `full=False` hashes the library only and checks the other files' sizes."""
    out: list[tuple[str, str | None]] = []

    def run(what: str, fn: Any) -> None:
        try:
            fn()
            out.append((what, None))
        except (ArtifactError, OSError) as e:
            out.append((what, str(e)))

    run(MANIFEST_SUM, lambda: check_manifest_sum(path))
    try:
        files = _listing(path, manifest)
    except ArtifactError as e:
        return out + [(MANIFEST, str(e))]
    for rel in sorted(files, key=lambda r: (r != LIBRARY, r)):  # the library first: it is code
        run(rel, lambda rel=rel: _check_file(path, rel, files[rel], full or rel == LIBRARY))
    for rel in _unlisted(path, files):
        out.append((rel, f"{rel} is in the artifact but not in its manifest, and the runtime would load it: rebuild"))
    return out


def _check_file(path: str, rel: str, meta: dict[str, Any], hashed: bool) -> None:
    p = member(path, rel)
    size = os.path.getsize(p)
    if size != meta["bytes"]:
        raise ArtifactError(
            f"{rel} has {size} bytes, the manifest says {meta['bytes']}: the file is truncated or replaced; "
            "rebuild the artifact"
        )
    if not hashed:
        return
    algo, expected = checked_digest(meta)
    if HASHING_READERS.get(rel, _plain_hash)(p, expected, algo) != expected:
        raise ArtifactError(f"checksum mismatch for {rel}: the file is corrupt or was modified; rebuild the artifact")


def _plain_hash(path: str, expected: str, algo: str = "sha256") -> str:
    return file_digest(path, algo)


# A loader may take over hashing one file (by its name in the artifact): it reads the file once, into the
# memory it will load from, hashes those very bytes, and keeps them only when they match `expected`
# (kiln.runtime.artifact.hand_verified_weights_to_loader). Called as reader(path, expected, algorithm).
# Empty unless a program asks for it.
HASHING_READERS: dict[str, Callable[[str, str, str], str]] = {}


def _hash_order(rel: str) -> tuple[bool, bool, str]:
    # the library first (it is code and is opened first), the weights last (the most bytes, needed last)
    return (rel != LIBRARY, rel == WEIGHTS, rel)


def verify_files(
    path: str, manifest: dict[str, Any], full: bool = True, before_weights: Callable[[], None] | None = None
) -> None:
    """Refuse the artifact at the first failed check (see the module docstring for the order).
    `before_weights` is called once every check but the weights' checksum has passed (the loader opens the
    library and the tokenizer then, while the weights are still being hashed)."""
    check_manifest_sum(path)
    files = _listing(path, manifest)
    for rel in sorted(files, key=_hash_order):
        member(path, rel)
    for rel in sorted(files, key=_hash_order):
        _check_file(path, rel, files[rel], hashed=False)
    extra = _unlisted(path, files)
    if extra:
        raise ArtifactError(
            f"{extra[0]} is in the artifact but not in its manifest, so it would be loaded unverified: remove it "
            "or rebuild the artifact"
        )
    for rel in sorted(files, key=_hash_order):
        if rel == WEIGHTS and before_weights is not None:
            before_weights()
            before_weights = None
        if full or rel == LIBRARY:
            _check_file(path, rel, files[rel], hashed=True)
    if before_weights is not None:
        before_weights()


class BackgroundVerification:
    """`verify_files` on a thread, started before the loader imports TVM, in two stages the loader waits
    for separately: everything but the weights' checksum (`wait_for_code`: the library may then be opened,
    and the tokenizer read), then the weights' (`wait`: before the weights are bound and anything runs).
    The checks are the same and as complete as `verify_files`; only their waiting overlaps with the load.
    A failed check is raised by whichever wait comes next."""

    def __init__(self, path: str, manifest: dict[str, Any], full: bool = True) -> None:
        import threading

        self._code, self._done = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path, manifest, full), name="kiln-verify", daemon=True)
        self._thread.start()

    def _run(self, path: str, manifest: dict[str, Any], full: bool) -> None:
        try:
            verify_files(path, manifest, full, before_weights=self._code.set)
        except BaseException as e:  # handed to the waiting thread
            self._error = e
        finally:
            self._code.set()
            self._done.set()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def wait_for_code(self) -> None:
        """Return once every check but the weights' checksum has passed; raise the first failure."""
        self._code.wait()
        self._raise()

    def wait(self) -> None:
        """Return once every check has passed; raise the first failure."""
        self._thread.join()
        self._raise()
