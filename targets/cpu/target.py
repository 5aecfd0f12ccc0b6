"""Target `cpu`: TVM LLVM codegen for the host CPU, with kiln's hand-scheduled kernels."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import tvm

from kiln.ir import Graph

from kiln.targets.common.relax import Lowering, WeightSpec

# The x86 features an artifact needs from the CPU that runs it, checked at load time.
_X86_FEATURES = ("sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl")


def host_cpu() -> str:
    from tvm.target import codegen
    return str(codegen.llvm_get_system_cpu())


@dataclass
class BuildResult:
    """What a target hands to the packager: the compiled library and how to bind weights."""
    executable: Any
    weight_specs: list[WeightSpec]
    target: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    kernels: list[str] = field(default_factory=list)

    def export(self, path: str) -> None:
        self.executable.export_library(path)


class CpuTarget:
    name = "cpu"

    def __init__(self, mcpu: str | None = None) -> None:
        self.mcpu = mcpu or host_cpu()

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": self.mcpu})

    def describe(self) -> dict[str, Any]:
        from tvm.target import codegen
        feats = {str(f) for f in codegen.llvm_get_cpu_features(self.tvm_target())}
        return {"name": self.name, "kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": self.mcpu,
                "requires": sorted(f for f in _X86_FEATURES if f in feats)}

    def build(self, graph: Graph, entry_points: dict[str, dict[str, int]] | None = None) -> BuildResult:
        entry_points = entry_points or graph.meta.get("entry_points") or {"prefill": {"batch": 1},
                                                                         "decode": {"tokens": 1}}
        t0 = time.perf_counter()
        low = Lowering(graph, self.name)
        mod = low.lower(entry_points)
        t1 = time.perf_counter()
        ex = tvm.compile(mod, target=self.tvm_target())
        t2 = time.perf_counter()
        return BuildResult(ex, low.weight_specs, self.describe(), {"lower": t1 - t0, "tvm_build": t2 - t1},
                           sorted(gv.name_hint for gv in low.kernels.values()))

