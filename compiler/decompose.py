"""Decompose, with torch's own tables, the aten ops of an exported program that kiln cannot convert.

The tracer converts a fixed set of aten ops (compiler/aten_convert.py). A decoder's export may hold
others that are compositions of those (`type_as`, `repeat_interleave`, `square`, `baddbmm`,
`where.ScalarOther`, ...). Rather than one hand-written conversion per composite, the ops that have
no conversion are decomposed with torch's decomposition tables (core ATen first, then the full
table), only those, until every op converts or no table knows the rest; what remains is reported by
the converter with the op and the model's source line.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Container
from typing import Any

import torch

MAX_ROUNDS = 4  # a decomposition may yield ops that decompose again; real graphs settle in two


def unconverted(ep: Any, convertible: Container) -> set:
    """The call_function targets of `ep` that have no conversion."""
    return {n.target for n in ep.graph.nodes if n.op == "call_function" and n.target not in convertible}


def _table() -> dict[Any, Callable]:
    from torch._decomp import core_aten_decompositions, decomposition_table

    table: dict[Any, Callable] = dict(decomposition_table)
    table.update(core_aten_decompositions())  # core ATen's choice wins where both know an op
    return table


def decompose_unconverted(ep: Any, convertible: Container, first: bool = False) -> tuple[Any, list[str]]:
    """Decompose every op of `ep` that has no conversion and that torch knows how to decompose.

    Returns the new program and the names of the ops decomposed (for the build log). Ops that
    convert are never decomposed, so recognizers still see `linear`, `softmax`, `layer_norm`.
    `first`: `ep` is export's training-IR program, which needs one `run_decompositions` anyway (to
    the inference IR); the first round rides on it, so a model needing no more costs nothing extra."""
    table = _table()
    done: list[str] = []
    for _ in range(MAX_ROUNDS):
        todo = {op: table[op] for op in unconverted(ep, convertible) if op in table}
        if not todo and not first:
            break
        first = False
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations, not the user's
            ep = ep.run_decompositions(todo)
        done.extend(sorted(str(op) for op in todo))
    return ep, done
