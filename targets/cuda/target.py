"""Target `cuda`: NVIDIA GPUs (sm_80, sm_90a), built on any host, run with TVM's runtime only.

Activations stay fp32 between kernels (they are small at decode, and rotary angles need the precision);
weights are fp16 or quantized; the KV cache is fp16. What runs where is in lowering.py. The library holds CUDA
source: the runtime compiles it for the GPU on first load and caches the binary (runtime/cuda.py).
"""

from __future__ import annotations

from typing import Any

import tvm

from kiln.entry import EntryPoint
from kiln.errors import KilnError
from kiln.ir import Graph
from kiln.targets.base import BuildResult
from kiln.targets.common.tvm_target import TvmTarget

from . import flash as F
from . import qgemv as Q
from .lowering import CudaLowering

ARCHS = {"sm_80": "8.0", "sm_86": "8.6", "sm_89": "8.9", "sm_90": "9.0", "sm_90a": "9.0"}
_CODEGEN_ARCH: dict[str, str] = {}  # see CudaTarget.tvm_target


def gemv_max_batch(graph: Graph) -> int:
    """The largest decode batch that runs the GEMV kernels; larger batches run `decode_batched` (tensor-core
    GEMMs, and for quantized weights a dequantization of every weight each step first). Measured on an
    H200, Llama-3.1-8B shape, decode tok/s GEMV / GEMM (bench/gpu_decode.py, KILN_CROSSOVER):
    fp16 batch 1: 202 / 185, batch 2: 314 / 359, batch 8: 509 / 1231; int4 batch 8: 693 / 300, batch 16:
    717 / 579, batch 24: 720 / 840 (int8 alike; figures of the CUDA-core quantized GEMV). fp16 leaves the GEMV
    at batch 2, quantized weights after 16 (one pass of the tensor-core GEMV, two n-tiles of 8 rows)."""
    return Q.MB if any(n.op == "qweight" for n in graph.nodes) else 1


def prefill_attention(graph: Graph, mode: str = "fused") -> dict[str, Any]:
    """How prefill and verify attend, for the manifest and the memory estimate (compiler/kvplan.py): the fused
    kernel (targets/cuda/flash.py) when it is chosen and takes every layer's head size; otherwise the
    [heads, tokens, context] scores are materialized (fp32 scores and mask, fp16 probabilities: 10 bytes an
    element) over K/V gathered out of the pages."""
    dims = {int(n.inputs[1].type.shape[3]) for n in graph.nodes if n.op == "cached_attention"}
    if mode == "fused" and all(F.supported(d) for d in dims):
        return {"prefill_attention": "fused (flash, paged)", "prefill_scores_bytes": 0, "prefill_gathers_kv": False}
    return {"prefill_attention": "gathered pages, two GEMMs", "prefill_scores_bytes": 10, "prefill_gathers_kv": True}


class CudaTarget(TvmTarget):
    name = "cuda"
    capabilities = frozenset({"fp16", "int8", "int4", "sliding-window", "gqa", "tensor-cores", "tensor-parallel"})

    def __init__(
        self,
        arch: str = "sm_90a",
        gemm: str = "cublas",
        gemv_rows: int | None = None,
        gemv_splits: int | None = None,
        prefill_attention: str = "fused",
    ) -> None:
        if arch not in ARCHS:
            raise KilnError(f"unknown CUDA architecture '{arch}'; kiln builds for {', '.join(ARCHS)}")
        if gemm not in ("cublas", "tvm"):
            raise KilnError(
                f"unknown GEMM backend '{gemm}': use 'cublas' (tensor cores through the CUDA "
                "toolkit's cuBLAS at run time) or 'tvm' (TVM's own schedules, CUDA cores)"
            )
        if gemv_rows is not None and int(gemv_rows) not in (1, 2, 4, 8):
            raise KilnError(f"gemv_rows={gemv_rows}: the fp16 GEMV kernel gives each warp 1, 2, 4 or 8 output rows")
        if gemv_splits is not None and int(gemv_splits) not in (1, 2, 4):
            raise KilnError(f"gemv_splits={gemv_splits}: 1, 2 or 4 warps of a GEMV block can share a row")
        if prefill_attention not in ("fused", "gathered"):
            raise KilnError(
                f"unknown prefill attention '{prefill_attention}': use 'fused' (one tensor-core kernel over the "
                "paged cache) or 'gathered' (pages copied out, two GEMMs around a materialized softmax)"
            )
        self.prefill_attention = prefill_attention
        # output rows per warp (fp16 GEMV) and warps per row in the decode GEMVs; None: the kernel's choice by size
        self.arch, self.gemm = arch, gemm
        self.gemv_rows = None if gemv_rows is None else int(gemv_rows)
        self.gemv_splits = None if gemv_splits is None else int(gemv_splits)

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target(
            {"kind": "cuda", "arch": _CODEGEN_ARCH.get(self.arch, self.arch)},
            host={"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu"},
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "cuda",
            "arch": self.arch,
            "compute_capability": ARCHS[self.arch],
            "device_code": "CUDA source in the library; compiled for the GPU on first load and cached",
            "kv_cache_dtype": "float16",
            "weights_dtype": "float16 (or int8/int4 codes)",
            "gemm": self.gemm,
            "requires": ["libcublas"] if self.gemm == "cublas" else [],
            **({"gemv_rows": self.gemv_rows} if self.gemv_rows else {}),
            **({"gemv_splits": self.gemv_splits} if self.gemv_splits else {}),
        }

    def entry_points(self, graph: Graph) -> dict[str, EntryPoint]:
        eps = super().entry_points(graph)
        if "decode" in eps:  # batches too large for the GEMV kernel run the GEMM path
            eps["decode_batched"] = EntryPoint("decode_batched", dict(eps["decode"].dims), gemm=True)
        return eps

    def build(self, graph: Graph, entry_points: dict[str, EntryPoint] | None = None) -> BuildResult:
        out = super().build(graph, entry_points)
        out.target["gemv_max_batch"] = gemv_max_batch(graph)
        if "decode" in (entry_points or self.entry_points(graph)):  # CudaLowering.sample_function
            out.target["sampler"] = "sample: argmax or Gumbel-max draws of the last position, on the device"
        out.target.update(prefill_attention(graph, self.prefill_attention))
        return out

    def make_lowering(self, graph: Graph) -> CudaLowering:
        return CudaLowering(graph, self.name, self.gemm, self.gemv_rows, self.gemv_splits, self.prefill_attention)

    def compile_module(self, mod: tvm.IRModule) -> Any:
        with tvm.transform.PassContext(opt_level=3):
            return tvm.compile(mod, target=self.tvm_target())


TARGET = CudaTarget
