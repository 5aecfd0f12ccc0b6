"""Packaging: an `Artifact` in memory, written atomically as a self-describing directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.artifact import LIBRARY, MANIFEST, SCHEMA_VERSION, WEIGHTS, sha256_file

from .report import render_report


@dataclass
class Artifact:
    """A compiled model: the library, packed weights, tokenizer files and the manifest to describe them."""

    build: Any  # targets.cpu.BuildResult
    weights: dict[str, Any]  # field name -> numpy array, in the layout the library expects
    manifest: dict[str, Any]
    ir_text: str
    tokenizer_dir: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str) -> str:
        """Write the artifact to `path` atomically: a crash leaves either the old directory or the new one."""

        def payload(tmp: str, manifest: dict[str, Any]) -> None:
            t0 = time.perf_counter()
            self.build.export(os.path.join(tmp, LIBRARY))
            from safetensors.numpy import save_file

            if self.manifest.get("weights_included", True):
                save_file(self.weights, os.path.join(tmp, WEIGHTS))
            manifest["timings"] = dict(self.timings, save=round(time.perf_counter() - t0, 3))

        self.manifest = write_artifact(path, dict(self.manifest), self.ir_text, self.tokenizer_dir, payload)
        return os.path.abspath(path)


def write_artifact(
    path: str,
    manifest: dict[str, Any],
    ir_text: str,
    tokenizer_dir: str | None,
    payload: Callable[[str, dict[str, Any]], None],
) -> dict[str, Any]:
    """The one way artifacts reach disk, for every target: `payload(tmp, manifest)` writes the
    target's files (and may add manifest fields) into a temporary directory beside `path`; then the
    tokenizer files, ir.txt, report.md and manifest.json (with every file's size and SHA-256) are
    added and the directory is swapped into place. A failure removes the temporary directory and
    leaves any previous artifact at `path` untouched. Returns the manifest as written."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".kiln-tmp-", dir=parent)
    try:
        payload(tmp, manifest)
        if tokenizer_dir:
            dst = os.path.join(tmp, "tokenizer")
            os.makedirs(dst)
            for name in os.listdir(tokenizer_dir):
                if name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
                    shutil.copy(os.path.join(tokenizer_dir, name), dst)
        with open(os.path.join(tmp, "ir.txt"), "w") as f:
            f.write(ir_text + "\n")
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(render_report(manifest))
        files = {}
        for root, _, names in os.walk(tmp):
            for n in sorted(names):
                p = os.path.join(root, n)
                files[os.path.relpath(p, tmp)] = {"bytes": os.path.getsize(p), "sha256": sha256_file(p)}
        manifest["files"] = files
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, default=str)
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_dir(src: str, dst: str) -> None:
    if os.path.exists(dst):
        old = dst + f".old-{os.getpid()}"
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    # Hard links make a cache hit instant; readers verify checksums, so a later in-place edit of one
    # copy is caught rather than trusted.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_artifact(src: str, dst: str) -> None:
    """Copy an artifact directory to `dst` atomically (hard links where the filesystem allows)."""
    dst = os.path.abspath(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".kiln-tmp-", dir=os.path.dirname(dst))
    try:
        os.rmdir(tmp)
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def kv_summary(kv: dict[str, Any], dtype: str | None = None) -> dict[str, Any]:
    """The KV-cache layout for the manifest, with the target's storage dtype when it stores the cache
    narrower than the IR's float32, and what it costs per token (all layers, keys, values and scales)."""
    import numpy as np

    if dtype:
        kv = dict(
            kv, dtype=dtype, tensors=[dict(t, dtype=dtype) if t["dtype"] == "float32" else t for t in kv["tensors"]]
        )
    per_token = sum(
        int(np.prod([int(d) for d in t["shape"][1:]])) * np.dtype(t["dtype"]).itemsize // kv["page_size"]
        for t in kv["tensors"]
    )
    return dict(kv, bytes_per_token=per_token)


__all__ = ["Artifact", "SCHEMA_VERSION", "copy_artifact", "kv_summary", "write_artifact"]
