"""Executing `linalg-on-tensors` MLIR on the CPU with torch-mlir's reference backend (MLIR -> LLVM ->
ExecutionEngine), so an exported module itself can be checked numerically."""

from __future__ import annotations

from typing import Any

import torch

from kiln.errors import KilnError


def _refbackend_pipeline() -> str:
    # torch-mlir's RefBackend lowering (torch_mlir_e2e_test/linalg_on_tensors_backends/refbackend.py),
    # whose refback-* passes ship in the torch-mlir wheel although the e2e test package does not.
    passes = [
        "func.func(linalg-generalize-named-ops)",
        "func.func(linalg-fuse-elementwise-ops)",
        "convert-shape-to-std",
        "sparse-assembler{direct-out}",
        "sparsification-and-bufferization",
        "sparse-storage-specifier-to-llvm",
        "func.func(expand-realloc)",
        "func.func(refback-generalize-tensor-pad)",
        "func.func(refback-generalize-tensor-concat)",
        "func.func(tm-tensor-bufferize)",
        "one-shot-bufferize{copy-before-write bufferize-function-boundaries "
        "function-boundary-type-conversion=identity-layout-map}",
        "refback-mlprogram-bufferize",
        # (upstream's func.func(buffer-deallocation) is gone from this MLIR: the ownership-based trio replaces it)
        "ownership-based-buffer-deallocation",
        "buffer-deallocation-simplification",
        "bufferization-lower-deallocations",
        "inline",
        "refback-munge-calling-conventions",
        "func.func(tm-tensor-to-loops)",
        "func.func(refback-munge-memref-copy)",
        "func.func(convert-linalg-to-loops)",
        "func.func(lower-affine)",
        "convert-scf-to-cf",
        "func.func(refback-expand-ops-for-llvm)",
        "func.func(arith-expand)",
        "func.func(convert-math-to-llvm)",
        "convert-math-to-libm",
        "expand-strided-metadata",
        "finalize-memref-to-llvm",
        "lower-affine",
        "convert-bufferization-to-memref",
        "finalize-memref-to-llvm",
        "func.func(convert-arith-to-llvm)",
        "convert-vector-to-llvm",
        "convert-func-to-llvm",
        "convert-cf-to-llvm",
        "convert-complex-to-llvm",
        "reconcile-unrealized-casts",
    ]
    return "builtin.module(" + ",".join(passes) + ")"


_NP = {
    "mrf16": "float16",
    "mrf32": "float32",
    "mrf64": "float64",
    "mri1": "bool",
    "mri8": "int8",
    "mri32": "int32",
    "mri64": "int64",
}
_RET = "refbackend_consume_func_return_"


class RefBackend:
    """Runs a `linalg-on-tensors` MLIR file (or text) on the CPU with torch-mlir's ExecutionEngine.

    `RefBackend(text).call(entry, *numpy_arrays)` returns the results as numpy arrays. opt_level is
    LLVM's: 0 compiles SmolLM2-135M in ~10 s (prefill of 11 tokens ~40 s); 2 takes ~4 min to compile it."""

    def __init__(self, mlir_text: str, opt_level: int = 0) -> None:
        import ctypes

        import numpy as np
        from torch_mlir import ir
        from torch_mlir.compiler_utils import run_pipeline_with_repro_report
        from torch_mlir.dialects import torch as torch_d
        from torch_mlir.execution_engine import ExecutionEngine
        from torch_mlir.runtime import UnrankedMemRefDescriptor, unranked_memref_to_numpy

        self._ctx = ir.Context()
        torch_d.register_dialect(self._ctx)
        from torch_mlir.passmanager import PassManager

        with self._ctx:
            # the exported text may hold tm_tensor ops (scatter): running a pass that depends on the dialect
            # loads it into the context so the parser knows it
            PassManager.parse("builtin.module(func.func(tm-tensor-bufferize))").run(
                ir.Module.parse("module {}").operation
            )
            module = ir.Module.parse(mlir_text)
        run_pipeline_with_repro_report(module, _refbackend_pipeline(), "RefBackend lowering")
        self._ee = ExecutionEngine(module, opt_level=opt_level)
        self._result: Any = None
        self._keep = []
        with module.context:
            names = [str(op.attributes["sym_name"]).strip('"') for op in module.body]
        for fname in names:
            if not fname.startswith(_RET):
                continue
            types = fname[len(_RET) :].split("_")
            cty = ctypes.CFUNCTYPE(None, *[ctypes.POINTER(UnrankedMemRefDescriptor) for _ in types])

            def consume(*args, types=types):
                self._result = tuple(
                    np.array(unranked_memref_to_numpy(a, np.dtype(_NP[t]))) for a, t in zip(args, types)
                )

            cb = cty(consume)
            self._keep.append(cb)
            self._ee.register_runtime(fname, cb)

    def call(self, name: str, *arrays) -> tuple:
        import ctypes

        import numpy as np
        from torch_mlir.runtime import get_unranked_memref_descriptor

        ffi = []
        keep = []
        for a in arrays:
            a = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else a)
            keep.append(a)
            ffi.append(ctypes.pointer(ctypes.pointer(get_unranked_memref_descriptor(a))))
        self._ee.invoke(name, *ffi)
        out, self._result = self._result, None
        if out is None:
            raise KilnError(f"RefBackend: {name} produced no result")
        return out


# -- artifact directory (kiln.compile(target="mlir")) --------------------------------------------------
