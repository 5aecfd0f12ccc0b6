"""Errors that speak to the user: what is wrong, where it came from, and what to do.

`KilnError` and `ArtifactError` are defined by the runtime (kiln.runtime.errors), which cannot import
the compile side; they are re-exported here so compile-side code has one place to import errors from.
"""

from __future__ import annotations

from kiln.runtime.errors import ArtifactError, KilnError

__all__ = ["KilnError", "ArtifactError", "UnsupportedOpError", "PassError"]


class UnsupportedOpError(KilnError):
    def __init__(self, op: str, source: str | None, detail: str = "", hint: str | None = None) -> None:
        self.op, self.source = op, source
        where = f" at {source}" if source else " (no model source line recorded)"
        hint = hint or (
            "kiln's tracer has no conversion for it and torch's decomposition tables none to ops it has: "
            "add one to the table in compiler/aten_convert.py (used by compiler/trace.py), "
            "or change the model to use a supported op"
        )
        super().__init__(f"unsupported op {op}{where}{': ' + detail if detail else ''}. {hint}")


class PassError(KilnError):
    pass
