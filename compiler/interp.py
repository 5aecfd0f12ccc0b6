"""Reference interpreter: runs any kiln graph op by op in torch eager. The oracle for pass tests."""
from __future__ import annotations

from typing import Any

import sympy
import torch

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


def run(graph: Graph, inputs: dict[str, torch.Tensor], params: dict[str, torch.Tensor] | None = None,
        return_env: bool = False, observe=None, grad: bool = False) -> list[torch.Tensor] | tuple[list[torch.Tensor], dict]:
    """Execute `graph` on named inputs; returns the outputs (in order).

    `observe(node, value)` sees every computed value (calibration); unless `return_env`, values are
    freed after their last use so large models run in bounded memory. `grad=True` records autograd
    (parameters passed with `requires_grad` get gradients: distillation); the default runs without."""
    params = graph.params if params is None else params
    ctx = _Ctx(bind_dims(graph, inputs))
    values: dict[Node, torch.Tensor] = {}
    last_use: dict[Node, int] = {}
    if not return_env:
        for i, n in enumerate(graph.nodes):
            for x in n.inputs:
                last_use[x] = i
        for o in graph.outputs:
            last_use[o] = len(graph.nodes)
    with torch.set_grad_enabled(grad):
        for idx, node in enumerate(graph.nodes):
            if node.op == "input":
                values[node] = inputs[node.name]
            elif node.op == "param":
                values[node] = params[node.attrs["name"]]
            else:
                ctx.node = node
                try:
                    values[node] = OPS[node.op].ref(ctx, [values[i] for i in node.inputs], node.attrs)
                except Exception as e:  # name the node: a bare torch error says nothing of where
                    raise RuntimeError(f"interpreter failed at {node.name} = {node.op}"
                                       f"({', '.join(i.name for i in node.inputs)}): {e}") from e
                if observe is not None:
                    observe(node, values[node])
            if not return_env:
                for x in node.inputs:
                    if last_use.get(x) == idx:
                        values.pop(x, None)
    outs = [values[o] for o in graph.outputs]
    return (outs, values) if return_env else outs


__all__ = ["run", "bind_dims", "sympy"]


def evaluate_subgraph(graph: Graph, node: Node, dims: dict[str, int]) -> torch.Tensor:
    """Evaluate one node whose ancestors read no graph inputs, with symbolic dims bound by name."""
    from .ir import sym
    anc = graph.ancestors(node) | {node}
    if any(n.op == "input" for n in anc):
        raise ValueError(f"%{node.name} depends on graph inputs")
    ctx = _Ctx({sym(k): v for k, v in dims.items()})
    values: dict[Node, torch.Tensor] = {}
    with torch.no_grad():
        for n in graph.nodes:
            if n not in anc:
                continue
            if n.op == "param":
                values[n] = graph.params[n.attrs["name"]]
            else:
                ctx.node = n
                values[n] = OPS[n.op].ref(ctx, [values[i] for i in n.inputs], n.attrs)
    return values[node]
