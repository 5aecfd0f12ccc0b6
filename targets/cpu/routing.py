"""CPU rules for the routing and gather ops (`topk`, `take`) and `cumsum`, through Relax's own operators.

These ops sit off the hot path of the models that use them (a router over a handful of experts, a
position table's rows, position ids from a mask), so TVM's generic kernels serve.
"""

from __future__ import annotations

from tvm import relax

from kiln.ops import register_rule


@register_rule("cpu", "topk")
def _topk(f, n, xs):
    a = n.attrs
    return f.emit(
        relax.op.topk(xs[0], k=a["k"], axis=a["dim"], ret_type=a["output"], largest=a["largest"], dtype="int64")
    )


@register_rule("cpu", "take")
def _take(f, n, xs):
    # mode=wrap: torch's negative indices count from the end (falcon's fused_qkv[..., [-2], :])
    return f.emit(relax.op.take(xs[0], xs[1], axis=n.attrs["dim"], mode="wrap"))


@register_rule("cpu", "cumsum")
def _cumsum(f, n, xs):
    return f.emit(relax.op.cumsum(xs[0], axis=n.attrs["dim"], dtype=n.type.dtype))
