"""Errors that speak to the user: what is wrong, where it came from, and what to do."""
from __future__ import annotations


class KilnError(Exception):
    """Base class of kiln's user-facing errors."""


class UnsupportedOpError(KilnError):
    def __init__(self, op: str, source: str | None, detail: str = "", hint: str | None = None) -> None:
        self.op, self.source = op, source
        where = f" at {source}" if source else " (no model source line recorded)"
        hint = hint or ("kiln's tracer has no conversion for it: add one to the table in compiler/trace.py, "
                        "or change the model to use a supported op")
        super().__init__(f"unsupported op {op}{where}{': ' + detail if detail else ''}. {hint}")


class PassError(KilnError):
    pass


class ArtifactError(KilnError):
    """A corrupt, mismatched or incomplete artifact, refused with its reason."""
