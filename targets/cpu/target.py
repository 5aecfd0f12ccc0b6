"""Target `cpu`: TVM LLVM codegen for the host CPU, with kiln's hand-scheduled kernels."""

from __future__ import annotations

from typing import Any

import tvm

from kiln.targets.common.tvm_target import TvmTarget

from . import moe, routing, ssm  # noqa: F401  (register their rules)
from .lowering import CpuLowering

# The x86 features an artifact needs from the CPU that runs it, checked at load time.
_X86_FEATURES = ("sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl")


def host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


class CpuTarget(TvmTarget):
    name = "cpu"
    capabilities = frozenset(
        {"fp32", "int8", "int4", "kv-int8", "w8a8", "alibi", "mla", "sliding-window", "gqa", "sparse-storage"}
        | {"tensor-parallel"}  # ranks as processes exchanging through shared memory (runtime/collectives.py)
    )
    lowering = CpuLowering

    def __init__(self, mcpu: str | None = None) -> None:
        self.mcpu = mcpu or host_cpu()

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": self.mcpu})

    def describe(self) -> dict[str, Any]:
        from tvm.target import codegen

        feats = {str(f) for f in codegen.llvm_get_cpu_features(self.tvm_target())}
        return {
            "name": self.name,
            "kind": "llvm",
            "mtriple": "x86_64-unknown-linux-gnu",
            "mcpu": self.mcpu,
            "requires": sorted(f for f in _X86_FEATURES if f in feats),
        }


TARGET = CpuTarget
