"""Target `mlir`: the optimized model exported through torch-mlir (see export.py), no TVM build.

`MlirTarget(forms=["linalg-on-tensors"], static=None)`: `forms` are torch-mlir output forms (torch,
linalg-on-tensors, tosa, stablehlo); `static` fixes symbolic sizes ({"batch": 1, ...}) for forms that
refuse them (tosa).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from kiln.ir import Graph
from kiln.targets.base import PackageInputs, Target

from .export import check_forms, export_mlir, torch_mlir_version


class MlirTarget(Target):
    name = "mlir"
    capabilities = frozenset({"fp32", "int8", "int4", "kv-int8", "kv-fp8", "alibi", "sliding-window", "gqa"})

    def __init__(self, forms: Sequence[str] | None = None, static: dict[str, int] | None = None) -> None:
        self.forms = check_forms(forms or ["linalg-on-tensors"])
        self.static = static

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "forms": self.forms, "static_shapes": self.static}

    def package(self, graph: Graph, inputs: PackageInputs) -> MlirArtifact:
        m = dict(inputs.manifest, tvm_version=None)
        return MlirArtifact(
            graph,
            self.forms,
            m,
            static_shapes=self.static,
            tokenizer_dir=inputs.tokenizer_dir,
            timings={k: round(v, 3) for k, v in inputs.timings.items()},
        )


class MlirArtifact:
    """An `mlir` build: the optimized graph plus the manifest fields kiln.compile computed. `save(dir)`
    writes manifest.json, <entry>.<form>.mlir, weights.safetensors, entry_points.json, ir.txt and
    report.md atomically (a failed write leaves the old directory intact)."""

    def __init__(
        self,
        graph: Graph,
        forms: Sequence[str] = ("linalg-on-tensors",),
        manifest: dict | None = None,
        static_shapes: dict[str, int] | None = None,
        timings: dict[str, float] | None = None,
        tokenizer_dir: str | None = None,
    ) -> None:
        self.graph, self.forms = graph, check_forms(forms)
        self.manifest, self.static_shapes = dict(manifest or {}), static_shapes
        self.timings, self.tokenizer_dir = dict(timings or {}), tokenizer_dir

    def save(self, path: str) -> str:
        import time

        from kiln.artifact import write_artifact

        def payload(tmp: str, m: dict) -> None:
            t0 = time.perf_counter()
            res = export_mlir(self.graph, tmp, self.forms, static_shapes=self.static_shapes)
            m["target"] = {
                "name": "mlir",
                "forms": res["forms"],
                "torch_mlir_version": torch_mlir_version(),
                "static_shapes": self.static_shapes,
                "notes": res["notes"],
                "mlir_files": {k: os.path.basename(v) for k, v in res["files"].items()},
            }
            m["entry_points"] = res["entry_points"]
            m["weights"] = [
                {"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                for n, t in ((n, self.graph.params[n]) for n in sorted(self.graph.params))
            ]
            m["weight_bytes"] = os.path.getsize(res["files"]["weights"])
            m["timings"] = dict(self.timings, mlir_export=round(time.perf_counter() - t0, 3))

        self.manifest = write_artifact(path, dict(self.manifest), str(self.graph), self.tokenizer_dir, payload)
        return os.path.abspath(path)


TARGET = MlirTarget
