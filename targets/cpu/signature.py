"""Optional kernel arguments: write a kernel's signature once, with every argument it may take.

TVMScript has no optional parameters, so a kernel with a bias or ALiBi slopes would otherwise be
written once per combination of arguments. Instead the kernel is parsed with all of them, its body
reading an optional one only when the variant has it, and :func:`drop_params` removes the others.
"""

from __future__ import annotations

from collections.abc import Iterable

import tvm


def drop_params(func: tvm.tirx.PrimFunc, names: Iterable[str], symbol: str) -> tvm.tirx.PrimFunc:
    """``func`` without the parameters called ``names``, exported as ``symbol``.

    Raises ValueError when the body still reads a dropped parameter (the variant's body must not).
    """
    drop = set(names)
    params = [p for p in func.params if p.name not in drop]
    missing = drop - {p.name for p in func.params}
    if missing:
        raise ValueError(f"{symbol}: no parameter named {sorted(missing)}")
    used = {v.name for v in tvm.tirx.analysis.undefined_vars(func.body, params)}
    if used & drop:
        raise ValueError(f"{symbol}: the body still reads dropped parameter(s) {sorted(used & drop)}")
    out = tvm.tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)
    return out.with_attr("global_symbol", symbol)
