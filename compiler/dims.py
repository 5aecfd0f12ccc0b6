"""One evaluator for symbolic dimensions, with interchangeable back ends.

A dimension is a sympy expression over named symbols (`batch`, `tokens`, `pages` ...). Evaluating it
means walking it with some arithmetic: Python ints, torch SymInts while exporting (no specialization),
or TIR expressions while lowering. `eval_dim` is that walk, written once; a back end supplies how a
constant is made and how floor division is done.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import sympy


class DimError(ValueError):
    """A dimension expression that cannot be evaluated (an unbound symbol, an unsupported form)."""


def eval_dim(
    e: Any,
    env: Mapping[str, Any],
    const: Callable[[int], Any] = int,
    floordiv: Callable[[Any, Any], Any] = operator.floordiv,
) -> Any:
    """Evaluate dim `e` (or a nested list/tuple of dims; other values pass through) with symbols bound by
    name in `env`."""

    def ev(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(ev(y) for y in x)
        if not isinstance(x, sympy.Basic):
            return x
        if x.is_Integer:
            return const(int(x))
        if x.is_Symbol:
            if x.name not in env:
                raise DimError(f"dimension {x} is not bound (bindings: {', '.join(sorted(env)) or 'none'})")
            return env[x.name]
        if isinstance(x, sympy.Add):
            out = ev(x.args[0])
            for a in x.args[1:]:
                out = out + ev(a)
            return out
        if isinstance(x, sympy.Mul):
            num, den = x.as_numer_denom()
            if den != 1:
                return floordiv(ev(num), ev(den))
            out = ev(x.args[0])
            for a in x.args[1:]:
                out = out * ev(a)
            return out
        if isinstance(x, (sympy.floor, sympy.ceiling)) and isinstance(x.args[0], sympy.Mul):
            num, den = x.args[0].as_numer_denom()
            n, d = ev(num), ev(den)
            return floordiv(n, d) if isinstance(x, sympy.floor) else -floordiv(-n, d)
        if isinstance(x, sympy.Pow) and x.exp.is_Integer and int(x.exp) > 0:
            b = ev(x.base)
            out = b
            for _ in range(int(x.exp) - 1):
                out = out * b
            return out
        raise DimError(f"dimension expression {x} has no form over symbolic sizes")

    return ev(e)
