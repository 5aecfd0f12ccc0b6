"""Packaging: an `Artifact` in memory, written atomically as a self-describing directory."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.artifact import LIBRARY, MANIFEST, MANIFEST_SUM, SCHEMA_VERSION, WEIGHTS, ArtifactError
from kiln.runtime.integrity import file_entry, manifest_sum_line

from .atomic_dir import write_dir
from .report import render_report

TOKENIZER_FILES = ("tokenizer", "special_tokens", "chat_template", "generation_config")


@dataclass
class Artifact:
    """A compiled model: the library, packed weights, tokenizer files and the manifest to describe them."""

    build: Any  # targets.cpu.BuildResult
    weights: dict[str, Any]  # field name -> numpy array, in the layout the library expects
    manifest: dict[str, Any]
    ir_text: str
    tokenizer_dir: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    drafts: dict[str, Any] = field(default_factory=dict)  # kind -> Artifact of a draft model (kiln/draft.py)
    ranks: list[Any] = field(default_factory=list)  # a tensor-parallel build's ranks 1..N-1 (this is rank 0)

    def save(self, path: str) -> str:
        """Write the artifact to `path` atomically: a crash leaves either the old directory or the new one."""

        def payload(tmp: str, manifest: dict[str, Any]) -> None:
            t0 = time.perf_counter()
            self.build.export(os.path.join(tmp, LIBRARY))
            from safetensors.numpy import save_file

            if self.manifest.get("weights_included", True):
                save_file(self.weights, os.path.join(tmp, WEIGHTS))
            if self.drafts:
                from .draft import save_drafts

                save_drafts(tmp, self.drafts, self.weights, manifest)
            if self.ranks:
                save_ranks(tmp, self.ranks, manifest)
            manifest["timings"] = dict(self.timings, save=round(time.perf_counter() - t0, 3))

        self.manifest = write_artifact(path, dict(self.manifest), self.ir_text, self.tokenizer_dir, payload)
        return os.path.abspath(path)


RANKS_DIR = "ranks"


def save_ranks(tmp: str, ranks: list[Artifact], manifest: dict[str, Any]) -> None:
    """Write a tensor-parallel build's ranks 1..N-1 under tmp/ranks/R/, each a whole artifact of its own
    (library, its weight shard, manifest), and list them in rank 0's manifest: tensor_parallel.members[R]
    is rank R's directory, relative to rank 0's ("" for rank 0 itself)."""
    members = [""]
    for art in ranks:
        r = int(art.manifest["tensor_parallel"]["rank"])

        def payload(d: str, m: dict[str, Any], art: Artifact = art) -> None:
            art.build.export(os.path.join(d, LIBRARY))
            if art.manifest.get("weights_included", True):
                from safetensors.numpy import save_file

                save_file(art.weights, os.path.join(d, WEIGHTS))

        path = os.path.join(tmp, RANKS_DIR, str(r))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_artifact(path, dict(art.manifest), art.ir_text, None, payload)
        members.append(f"{RANKS_DIR}/{r}")
    manifest["tensor_parallel"] = dict(manifest["tensor_parallel"], members=members)


def write_artifact(
    path: str,
    manifest: dict[str, Any],
    ir_text: str,
    tokenizer_dir: str | None,
    payload: Callable[[str, dict[str, Any]], None],
) -> dict[str, Any]:
    """The one way artifacts reach disk, for every target: `payload(tmp, manifest)` writes the
    target's files (and may add manifest fields) into a temporary directory beside `path`; then the
    tokenizer files, ir.txt, report.md, manifest.json (with every file's size and SHA-256) and
    manifest.sha256 (the manifest's own) are added, everything is fsynced and the directory is swapped
    into place in one step (kiln/atomic_dir.py). A failure or a crash at any point leaves the previous
    artifact at `path` (or the new one, once swapped). Returns the manifest as written."""

    def fill(tmp: str) -> None:
        payload(tmp, manifest)
        if tokenizer_dir:
            dst = os.path.join(tmp, "tokenizer")
            os.makedirs(dst)
            for name in os.listdir(tokenizer_dir):
                src = os.path.join(tokenizer_dir, name)
                if name.startswith(TOKENIZER_FILES) and os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(dst, name))  # contents only: never a link or device
        with open(os.path.join(tmp, "ir.txt"), "w") as f:
            f.write(ir_text + "\n")
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(render_report(manifest))
        files = {}
        for root, _, names in os.walk(tmp):
            for n in sorted(names):
                p = os.path.join(root, n)
                files[os.path.relpath(p, tmp)] = file_entry(p)  # size, SHA-256, BLAKE3 (what the loader checks)
        manifest["files"] = files
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, default=str)
        with open(os.path.join(tmp, MANIFEST_SUM), "w") as f:
            f.write(manifest_sum_line(os.path.join(tmp, MANIFEST)))

    write_dir(path, fill)
    return manifest


def copy_artifact(src: str, dst: str) -> None:
    """Copy an artifact directory to `dst` atomically. Files are copied, never hard-linked: editing the
    copy must not edit the source (a build cache entry, say). `shutil.copyfile` lets the kernel share
    blocks where the filesystem can (copy_file_range)."""

    def fill(tmp: str) -> None:
        for root, dirs, names in os.walk(src):
            rel = os.path.relpath(root, src)
            for d in dirs:
                os.makedirs(os.path.join(tmp, rel, d), exist_ok=True)
            for n in names:
                s = os.path.join(root, n)
                if os.path.islink(s) or not os.path.isfile(s):
                    raise ArtifactError(f"{s} is not a regular file: an artifact holds only its own files")
                shutil.copyfile(s, os.path.join(tmp, rel, n))

    write_dir(dst, fill)


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
        if t["shape"][0] == "pages" and len(t["shape"]) > 1  # state tensors and the slot table hold no tokens
    )
    out = dict(kv, bytes_per_token=per_token)
    if kv.get("state"):  # fixed per sequence, whatever its length
        out["state_bytes_per_sequence"] = kv["state"]["bytes_per_sequence"]
    return out


__all__ = ["Artifact", "SCHEMA_VERSION", "copy_artifact", "kv_summary", "write_artifact"]
