"""Reference interpreter: runs any kiln graph op by op in torch eager. The oracle for pass tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, overload

import sympy
import torch

from .errors import KilnError
from .ir import Graph, Node
from .ops import OPS, evaluate


class _Ctx:
    def __init__(self, env: dict) -> None:
        self.env = env
        self.node: Node | None = None

    def eval(self, expr: Any) -> Any:
        return evaluate(expr, self.env)


def bind_dims(graph: Graph, inputs: dict[str, torch.Tensor]) -> dict:
    """Bind each symbolic input dimension to the size of the tensor passed for it."""
    env: dict = {}
    for node in graph.inputs:
        t = inputs[node.name]
        if len(t.shape) != node.type.rank:
            raise ValueError(f"input '{node.name}' must have rank {node.type.rank} ({node.type}), got {tuple(t.shape)}")
        for d, size in zip(node.type.shape, t.shape):
            if d.is_Symbol:
                if env.get(d, size) != size:
                    raise ValueError(f"dimension {d} bound to both {env[d]} and {size}")
                env[d] = size
            elif d.is_Integer and int(d) != size:
                raise ValueError(f"input '{node.name}' dim must be {d}, got {size} (expected {node.type})")
    return env


Step = Callable[[Any, Node, list], Any]  # step(ctx, node, input values) -> value


def reference_step(ctx: Any, node: Node, x: list) -> Any:
    """An op's reference semantics (its record's `ref`)."""
    return OPS[node.op].ref(ctx, x, node.attrs)


def execute(
    graph: Graph,
    inputs: dict[str, Any],
    params: dict[str, Any],
    ctx: Any,
    step: Step = reference_step,
    observe: Callable | None = None,
    free: bool = True,
    only: set[Node] | None = None,
) -> dict[Node, Any]:
    """The one op-by-op loop: every node's value from its inputs' values through `step` (the reference
    semantics, or a back end's overrides such as the MLIR program's functional paged cache). With
    `free`, a value is dropped after its last use (outputs stay); `only` restricts to a set of nodes.
    Errors name the node they happened at."""
    values: dict[Node, Any] = {}
    last_use: dict[Node, int] = {}
    if free:
        for i, n in enumerate(graph.nodes):
            for x in n.inputs:
                last_use[x] = i
        for o in graph.outputs:
            last_use[o] = len(graph.nodes)
    for idx, node in enumerate(graph.nodes):
        if only is not None and node not in only:
            continue
        if node.op == "input":
            values[node] = inputs[node.name]
        elif node.op == "param":
            values[node] = params[node.attrs["name"]]
        else:
            ctx.node = node
            try:
                values[node] = step(ctx, node, [values[i] for i in node.inputs])
            except Exception as e:  # name the node: a bare torch error says nothing of where
                if isinstance(e, KilnError):
                    raise
                raise RuntimeError(
                    f"interpreter failed at {node.name} = {node.op}({', '.join(i.name for i in node.inputs)}): {e}"
                ) from e
            if observe is not None:
                observe(node, values[node])
        if free:
            for x in node.inputs:
                if last_use.get(x) == idx:
                    values.pop(x, None)
    return values


@overload
def run(
    graph: Graph,
    inputs: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor] | None = None,
    return_env: Literal[False] = False,
    observe=None,
    grad: bool = False,
) -> list[torch.Tensor]: ...


@overload
def run(
    graph: Graph,
    inputs: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor] | None = None,
    *,
    return_env: Literal[True],
    observe=None,
    grad: bool = False,
) -> tuple[list[torch.Tensor], dict]: ...


def run(
    graph: Graph,
    inputs: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor] | None = None,
    return_env: bool = False,
    observe=None,
    grad: bool = False,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], dict]:
    """Execute `graph` on named inputs; returns the outputs (in order).

    `observe(node, value)` sees every computed value (calibration); unless `return_env`, values are
    freed after their last use so large models run in bounded memory. `grad=True` records autograd
    (parameters passed with `requires_grad` get gradients: distillation); the default runs without."""
    params = graph.params if params is None else params
    ctx = _Ctx(bind_dims(graph, inputs))
    with torch.set_grad_enabled(grad):
        values = execute(graph, inputs, params, ctx, observe=observe, free=not return_env)
    outs = [values[o] for o in graph.outputs]
    return (outs, values) if return_env else outs


__all__ = ["run", "bind_dims", "execute", "reference_step", "sympy"]


def evaluate_subgraph(graph: Graph, node: Node, dims: dict[str, int]) -> torch.Tensor:
    """Evaluate one node whose ancestors read no graph inputs, with symbolic dims bound by name."""
    from .ir import sym

    anc = graph.ancestors(node) | {node}
    if any(n.op == "input" for n in anc):
        raise ValueError(f"%{node.name} depends on graph inputs")
    ctx = _Ctx({sym(k): v for k, v in dims.items()})
    with torch.no_grad():
        return execute(graph, {}, graph.params, ctx, free=False, only=anc)[node]
