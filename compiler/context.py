"""The context an artifact supports (`max_context`): what the user asked for, checked against the model.

Positions at or past a learned position table (GPT-2's `wpe`) have no embedding: the program would read
past the table, so such a context is refused rather than built. Rotary models have no table; their
config's `max_position_embeddings` is only the default (capped at 8192 to keep the KV plan small).
"""

from __future__ import annotations

import numbers
from typing import Any

from .errors import KilnError

DEFAULT_CAP = 8192


def position_table_rows(model: Any) -> int | None:
    """Rows of the model's learned position embedding, if it has one: an nn.Embedding other than the
    token embedding whose name says positions (wpe, position_embeddings, embed_positions)."""
    import torch

    tok = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = [
        m.num_embeddings
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Embedding)
        and m is not tok
        and any(k in name.rsplit(".", 1)[-1] for k in ("wpe", "position"))
    ]
    return min(rows) if rows else None


def resolve_max_context(model: Any, requested: Any) -> int:
    """`requested` checked (a positive int, within a learned position table), or the model's default."""
    cfg = getattr(model, "config", None)
    table = position_table_rows(model)
    if requested is None:
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return min(v, DEFAULT_CAP, table or v)
        return min(2048, table or 2048)
    if isinstance(requested, bool) or not isinstance(requested, numbers.Integral) or int(requested) < 1:
        raise KilnError(
            f"max_context={requested!r}: give a positive number of positions (tokens of prompt plus output), "
            "or leave it out for the model's own"
        )
    requested = int(requested)
    if table is not None and requested > table:
        raise KilnError(
            f"max_context={requested} is larger than the model's learned position table ({table} rows): "
            f"positions past it have no embedding; use max_context <= {table}"
        )
    return requested
