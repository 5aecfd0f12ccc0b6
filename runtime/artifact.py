"""Artifact format: a directory with manifest.json, the compiled library, weights and tokenizer.

Readers check, in order: the manifest parses, its schema version is one this kiln reads, the target
is one this runtime serves and the host can run, and the files are the ones the build wrote
(runtime/integrity.py: the manifest's own checksum, names confined to the directory, every file's size
and SHA-256, the library's before it is opened).
"""

from __future__ import annotations

import json
import os
from typing import Any

from .errors import ArtifactError  # defined with the error root; importable from here as before
from .integrity import LIBRARY, MANIFEST, MANIFEST_SUM, WEIGHTS, member, sha256_file, verify_files

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is kilobytes; a huge one is not ours

__all__ = [
    "LIBRARY",
    "MANIFEST",
    "MANIFEST_SUM",
    "SCHEMA_VERSION",
    "WEIGHTS",
    "ArtifactError",
    "check_target",
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
