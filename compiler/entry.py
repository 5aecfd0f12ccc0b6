"""Entry points: the functions an artifact exports, each the same graph with some dims fixed.

The kv-cache pass declares them (`prefill`: batch 1, any length; `decode`: one token per sequence;
`verify`: several tokens per sequence with logits for all of them). A target may add its own (cuda's
`decode_batched`). Flags say how a function differs beyond its dims, so they never ride in the dims.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EntryPoint:
    name: str
    dims: dict[str, int] = field(default_factory=dict)  # symbolic dims fixed for this function
    all_logits: bool = False  # logits for every token, not only the last (speculative verification)
    gemm: bool = False  # batched path even at one token per sequence (a target's large-batch decode)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bind": dict(self.dims)}
        if self.all_logits:
            out["all_logits"] = True
        if self.gemm:
            out["gemm"] = True
        return out


def default_entry_points() -> dict[str, EntryPoint]:
    """What kv-cache derives: prefill, decode and verify."""
    return {
        "prefill": EntryPoint("prefill", {"batch": 1}),
        "decode": EntryPoint("decode", {"tokens": 1}),
        "verify": EntryPoint("verify", {}, all_logits=True),
    }
