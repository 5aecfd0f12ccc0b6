"""kiln targets: one folder per target (cpu, cuda, pim, mlir), each with a `target.py` defining its
`Target` subclass (see base.py); common/ holds what the TVM targets share (generic Relax lowering,
typed weight layouts, the TVM build and packaging). Nothing is imported until a target is asked for."""

from __future__ import annotations

from typing import Any


def get_target(name: str, **options: Any):
    """The target object for `name` (imports TVM's compiler only when called)."""
    from .base import get_target as _get

    return _get(name, **options)


def available_targets() -> list[str]:
    from .base import available_targets as _avail

    return _avail()
