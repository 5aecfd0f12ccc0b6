"""Compiled kernels that a cuda artifact carries: `kiln kernels ARTIFACT`, and the choice made at load.

A cuda artifact's library holds its kernels as CUDA C source; loading it asks kiln for a binary
(runtime/cuda.py), which nvcc compiles once per host into the kernel cache (~/.cache/kiln/cuda). A fresh
GPU host, a container, a read-only image: each pays nvcc on its first start. `kiln kernels ARTIFACT`, run
where nvcc exists (no GPU needed), compiles the source for the artifact's architecture once and stores
the fatbin in the artifact:

    kernels/<source sha256, 32 digits>.<arch>.fatbin
    manifest.json: "cuda_kernels": [{"file": ..., "arch": "sm_90a", "source_sha256": ..., "sha256": ...,
                                     "bytes": ..., "nvcc": "release 13.0, V13.0.88"}]

and lists it in the manifest's `files` (rewriting manifest.sha256), so the checksum pass covers it as it
covers the library: it is code, run on the GPU. At load, `artifact_kernel` returns the recorded fatbin
whose arch and source hash match; an entry for another arch, or one compiled from another source (the
library was rebuilt since), is passed over with a note, and the kernel cache and nvcc stay the fallback.
KILN_CUDA_KERNELS=0 passes over the artifact's kernels (to time nvcc, or to rule them out).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from typing import Any

from .errors import ArtifactError
from .integrity import LIBRARY, MANIFEST, MANIFEST_SUM, file_entry, manifest_sum_line, member

KERNELS_DIR = "kernels"
MANIFEST_KEY = "cuda_kernels"


def source_sha256(code: str) -> str:
    """The key of a kernel source: what a fatbin was compiled from."""
    return hashlib.sha256(code.encode()).hexdigest()


def artifact_kernel(path: str, manifest: dict[str, Any], code: str, arch: str) -> tuple[bytes | None, list[str]]:
    """The artifact's fatbin for this source and arch, or None; with a note for every entry passed over.
    A fatbin whose bytes do not match its recorded SHA-256 is passed over too (the checksum pass refuses
    it already, unless it was turned off)."""
    entries = manifest.get(MANIFEST_KEY) or []
    if not entries or os.environ.get("KILN_CUDA_KERNELS") == "0":
        return None, []
    key, notes = source_sha256(code), []
    for e in entries:
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("file", "arch", "source_sha256")):
            notes.append(f"a {MANIFEST_KEY} entry of the manifest is malformed ({e!r:.80}): ignored")
            continue
        if e["arch"] != arch:
            notes.append(f"{e['file']} is compiled for {e['arch']}, this artifact runs {arch}: ignored")
            continue
        if e["source_sha256"] != key:
            notes.append(
                f"{e['file']} was compiled from another kernel source than this library's (stale: run "
                f"`kiln kernels {path}` again): ignored"
            )
            continue
        try:
            p = member(path, e["file"])
            with open(p, "rb") as f:
                data = f.read()
        except (ArtifactError, OSError) as err:
            notes.append(f"{e['file']} cannot be read ({err}): ignored")
            continue
        if hashlib.sha256(data).hexdigest() != e.get("sha256"):
            notes.append(f"{e['file']} does not match its recorded SHA-256: ignored")
            continue
        return data, notes
    return None, notes + [f"no compiled kernels for {arch} in the artifact: compiling with nvcc (or the cache)"]


def library_sources(path: str) -> list[str]:
    """The CUDA C source of every cuda module in the artifact's library, read from its serialized form
    without a GPU or TVM's CUDA runtime: TVM hands each module's bytes (format string, function table,
    then the code as the last length-prefixed field) to the loader `ffi.Module.load_from_bytes.cuda`,
    which this registers for the length of one load to keep them."""
    from .tvm_import import load_tvm

    load_tvm()
    import tvm_ffi

    blobs: list[bytes] = []

    class _Kept(Exception):
        pass

    def keep(data: Any) -> Any:
        blobs.append(bytes(data))
        raise _Kept  # stop here: nothing from this load is used

    name = "ffi.Module.load_from_bytes.cuda"
    try:  # TVM's CUDA runtime first, where it loads (a GPU host): its loader is put back afterwards
        from .cuda import _load_cuda_runtime

        _load_cuda_runtime(load_tvm())
    except OSError:  # no GPU driver here: nothing registers the loader, and nothing needs it
        pass
    before = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, keep, override=True)
    try:
        load_tvm().runtime.load_module(member(path, LIBRARY))
    except Exception:  # _Kept, through TVM's error wrapping; or no cuda module (checked below)
        pass
    finally:
        if before is not None:
            tvm_ffi.register_global_func(name, before, override=True)
        else:
            tvm_ffi.remove_global_func(name)
    if not blobs:
        raise ArtifactError(f"{path}/{LIBRARY} holds no cuda module: is it a cuda artifact? (kiln inspect {path})")
    return [_code_of(b) for b in blobs]


def _code_of(blob: bytes) -> str:
    (n,) = struct.unpack_from("<Q", blob, 0)
    fmt = blob[8 : 8 + n].decode(errors="replace")
    if fmt not in ("cuda", "cu"):
        raise ArtifactError(f"the library's device code is already compiled (format '{fmt}'): nothing to do")
    for p in range(len(blob) - 8, 8 + n - 1, -1):  # the last field: a length that reaches the end exactly
        if struct.unpack_from("<Q", blob, p)[0] == len(blob) - p - 8:
            return blob[p + 8 :].decode()
    raise ArtifactError("the library's cuda module has no readable source: rebuild the artifact")


def nvcc_path() -> str | None:
    """nvcc on PATH, or where the CUDA toolkit installs it."""
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def nvcc_version(nvcc: str) -> str:
    r = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    return next((ln.split(", ", 1)[-1] for ln in r.stdout.splitlines() if "release" in ln), "unknown")


def store_kernels(path: str) -> list[dict[str, Any]]:
    """Compile the artifact's kernel source with nvcc for its architecture and store the fatbins in it
    (see the module docstring). The artifact is verified first (never bless a damaged one); entries for
    this arch are replaced, others kept. Returns the manifest's entries."""
    from .artifact import read_manifest, verify_files
    from .cuda import nvcc_fatbin

    manifest = read_manifest(path)
    t = manifest.get("target", {})
    if t.get("name") != "cuda":
        raise ArtifactError(f"kiln kernels compiles cuda artifacts' kernels; {path} is for target '{t.get('name')}'")
    verify_files(path, manifest)
    arch, nvcc = t.get("arch"), nvcc_path()
    if nvcc is None:
        raise ArtifactError("kiln kernels needs nvcc (the CUDA toolkit; no GPU needed): install it, or run it there")
    files: dict[str, Any] = manifest["files"]
    kept = [e for e in manifest.get(MANIFEST_KEY) or [] if isinstance(e, dict) and e.get("arch") != arch]
    for e in manifest.get(MANIFEST_KEY) or []:
        if e not in kept and isinstance(e, dict) and e.get("file") in files:
            files.pop(e["file"])
            if os.path.isfile(os.path.join(path, e["file"])):
                os.remove(os.path.join(path, e["file"]))
    entries = list(kept)
    os.makedirs(os.path.join(path, KERNELS_DIR), exist_ok=True)
    version = nvcc_version(nvcc)
    for code in library_sources(path):
        key = source_sha256(code)
        rel = f"{KERNELS_DIR}/{key[:32]}.{arch}.fatbin"
        data = nvcc_fatbin(code, arch, nvcc)
        with open(os.path.join(path, rel), "wb") as f:
            f.write(data)
        files[rel] = file_entry(os.path.join(path, rel))
        entries.append(
            {"file": rel, "arch": arch, "source_sha256": key, "sha256": files[rel]["sha256"], "bytes": len(data),
             "nvcc": version}
        )  # fmt: skip
    manifest[MANIFEST_KEY] = entries
    tmp = os.path.join(path, MANIFEST + ".partial")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(path, MANIFEST))
    with open(tmp, "w") as f:
        f.write(manifest_sum_line(os.path.join(path, MANIFEST)))
    os.replace(tmp, os.path.join(path, MANIFEST_SUM))
    return entries
