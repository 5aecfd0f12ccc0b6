"""Artifact format: a directory with manifest.json, the compiled library, weights and tokenizer.

Readers check, in order: the manifest parses, its schema version is one this kiln reads, the target
is one this runtime serves and the host can run, and every file's checksum matches.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .errors import ArtifactError  # defined with the error root; importable from here as before

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
WEIGHTS = "weights.safetensors"


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_manifest(path: str) -> dict[str, Any]:
    mf = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ArtifactError(f"{path} is not an artifact directory (it does not exist or is a file)")
    if not os.path.exists(mf):
        raise ArtifactError(f"{path} has no {MANIFEST}: not a kiln artifact, or an interrupted write")
    try:
        with open(mf) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mf} is not valid JSON ({e}); the artifact is corrupt: rebuild it") from e
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


def verify_files(path: str, manifest: dict[str, Any]) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path}/{MANIFEST} lists no files; the artifact is corrupt: rebuild it")
    for rel, meta in files.items():
        p = os.path.join(path, rel)
        if not os.path.exists(p):
            raise ArtifactError(f"{rel} is missing from {path}: the artifact is incomplete; rebuild it")
        if os.path.getsize(p) != meta["bytes"]:
            raise ArtifactError(
                f"{rel} has {os.path.getsize(p)} bytes, the manifest says {meta['bytes']}: "
                "the file is truncated or replaced; rebuild the artifact"
            )
        if sha256_file(p) != meta["sha256"]:
            raise ArtifactError(
                f"checksum mismatch for {rel}: the file is corrupt or was modified; rebuild the artifact"
            )
