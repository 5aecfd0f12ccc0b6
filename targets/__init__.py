"""kiln targets: each lowers optimized IR through TVM and carries its own kernels and cost model."""
from __future__ import annotations

TARGETS = ("cpu", "cuda", "pim", "mlir")


def get_target(name: str, **options):
    """Return the target object for `name` (only imports TVM's compiler when called)."""
    if name == "cpu":
        from .cpu.target import CpuTarget
        return CpuTarget(**options)
    if name == "cuda":
        from .cuda.target import CudaTarget
        return CudaTarget(**options)
    if name == "pim":
        from .pim.target import PimTarget
        return PimTarget(**options)
    from kiln.errors import KilnError
    raise KilnError(f"unknown target '{name}'; available targets: {', '.join(TARGETS)}")
