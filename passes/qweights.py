"""What the quantization passes share: the LM-head test, making a `qweight` node, folding an input scale."""

from __future__ import annotations

import torch

from kiln.ir import Graph, Node
from kiln.quant import WeightQuant

from .registry import count


def is_lm_head(g: Graph, n: Node) -> bool:
    """Does linear `n` produce the graph's output (the LM head)?"""
    return n in g.outputs or any(o.op in ("slice", "reshape") and n in o.inputs for o in g.outputs)


def make_qweight(g: Graph, name: str, w: torch.Tensor, scheme: WeightQuant, codes, scales, zeros, before: Node) -> Node:
    """A `qweight` node over new code/scale/zero parameters for weight `name` quantized by `scheme`."""
    base = name + f".{scheme.name}"
    q = g.add_param(base + ".codes", codes)
    s = g.add_param(base + ".scales", scales.float().contiguous())
    z = g.add_param(base + ".zeros", zeros.float().contiguous())
    g.meta.setdefault("param_bits", {})[base + ".codes"] = scheme.bits
    return g.add(
        "qweight",
        [q, s, z],
        {"bits": scheme.bits, "group": scheme.group_for(w.shape[1]), "sym": scheme.sym, "scheme": scheme.name},
        name="qw",
        before=before,
    )


def fold_input_scale(g: Graph, x: Node, users: list[Node], s: torch.Tensor) -> Node:
    """Make `users` see x / s: fold into an RMSNorm weight when only they read it, else multiply."""
    all_users = [u for u in g.nodes if x in u.inputs]
    if x.op == "rms_norm" and x.inputs[1].op == "param" and set(all_users) <= set(users):
        wname = x.inputs[1].attrs["name"]
        p = g.add_param(wname + ".awq", (g.params[wname] / s).contiguous())
        x.inputs = [x.inputs[0], p]
        count("awq-fold-norm")
        return x
    p = g.add_param(f"{x.name}.awq_inv_scale", (1.0 / s).contiguous())
    m = g.add("mul", [x, p], name=x.name + "_awq", before=users[0])
    count("awq-scale-input")
    return m
