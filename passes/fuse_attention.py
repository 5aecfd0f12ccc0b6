"""fuse-attention: recognize attention with its mask construction as one `attention` op."""

from __future__ import annotations

import torch

from kiln.interp import evaluate_subgraph
from kiln.ir import Graph, Node
from kiln.ops import same

from . import eager_attention as eager
from .registry import count, register


def strip_repeat_kv(k: Node) -> tuple[Node, int]:
    """reshape(expand(unsqueeze(x, 2), [B, Hkv, rep, T, D]), [B, Hkv*rep, T, D]) -> (x, rep)."""
    if k.op == "reshape" and k.inputs[0].op == "expand" and k.inputs[0].inputs[0].op == "unsqueeze":
        e, u = k.inputs[0], k.inputs[0].inputs[0]
        x = u.inputs[0]
        if u.attrs["dim"] == 2 and x.type.rank == 4 and e.type.rank == 5:
            rep = e.type.shape[2]
            if (
                rep.is_Integer
                and same(k.type.shape[1], x.type.shape[1] * rep)
                and same(k.type.shape[2], x.type.shape[2])
                and same(k.type.shape[3], x.type.shape[3])
            ):
                return x, int(rep)
    return k, 1


def classify_mask(g: Graph, mask: Node, probe: tuple[int, ...]) -> tuple[bool, int] | None:
    """Evaluate a mask that depends only on shapes at several lengths; return (causal, window)
    when it equals a causal (optionally sliding-window) mask at all of them, else None."""
    if any(n.op == "input" for n in g.ancestors(mask)):
        return None
    window = 0
    for t in probe:
        try:
            m = evaluate_subgraph(g, mask, {"batch": 1, "tokens": t})
        except Exception:
            return None
        if m.dtype != torch.bool:
            m = m > float("-inf") / 2 if m.is_floating_point() else m.bool()
        if not (m.dim() >= 2 and m.shape[-1] == t and m.shape[-2] == t):
            return None
        m = m.reshape(-1, t, t)
        allowed = int(m[0, -1].sum())  # the last query sees min(t, window) keys
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        ref = j <= i
        if allowed < t:
            window = allowed if window in (0, allowed) else -1
            ref = ref & (j > i - allowed)
        if window < 0 or not bool((m == ref).all()):
            return None
    return True, window


@register("fuse-attention", phase="recognize")
def fuse_attention(graph: Graph, probe: str = "9,17") -> Graph:
    """Matches: `sdpa(q, k, v, mask)` whose mask is built from shapes alone (no input values) and
    evaluates to a causal or sliding-window mask at the probe lengths and at the model's maximum
    length; also `is_causal=True` without a mask. Looks through the repeat_kv expansion of keys and
    values (GQA/MQA). Guarantees: each match is `attention(q, k, v, scale, causal, window)` with k/v
    holding the model's own number of KV heads; the mask construction becomes dead. Exact.
    Where the graph has no sdpa, also matches attention written as matmul + softmax (eager_attention.py:
    scalar scale, tanh softcap, a causal / sliding-window mask and an ALiBi bias built from shapes),
    which becomes `attention(q, k, v, scale, causal, window, alibi, softcap)`.
    Does not fire on masks that depend on input values (padding masks) or are not causal; each layer
    left as plain ops is listed with the reason in `graph.meta["attention_fallbacks"]`."""
    g = graph.copy()
    fallbacks: list[dict] = []
    lengths = tuple(int(x) for x in probe.split(",")) + (int(g.meta.get("max_tokens", 4096)),)
    verdicts: dict[Node, tuple[bool, int] | None] = {}
    for n in list(g.nodes):
        if n.op != "sdpa":
            continue
        mask = n.input("mask")
        if mask is not None:
            if mask not in verdicts:
                verdicts[mask] = classify_mask(g, mask, lengths)
            verdict = verdicts[mask]
        else:
            verdict = (True, 0) if n.attrs["causal"] else None
        if verdict is None:
            why = "its mask is not causal or sliding-window, or depends on input values (ALiBi, padding)"
            fallbacks.append({"node": n.name, "source": n.source, "reason": why})
            continue
        q, k, v = n.inputs[:3]
        k, rk = strip_repeat_kv(k)
        v, rv = strip_repeat_kv(v)
        if rk != rv:
            fallbacks.append({"node": n.name, "source": n.source, "reason": "keys and values repeat differently"})
            continue
        att = g.add(
            "attention",
            [q, k, v],
            {"scale": n.attrs["scale"], "causal": True, "window": verdict[1]},
            name="attention",
            before=n,
            source=n.source,
        )
        g.replace_all_uses(n, att)
        g.nodes.remove(n)
        count("attention")
        if rk > 1:
            count("gqa-repeat-removed")
    if not g.find("sdpa") and not g.find("attention"):
        fallbacks.extend(_eager_attention(g, lengths))
    g.meta["attention_fallbacks"] = fallbacks
    g.dce()
    return g


def _eager_attention(g: Graph, lengths: tuple[int, ...]) -> list[dict]:
    """Softmaxes over a [.., tokens, tokens] score matrix: attention the model wrote as matmul + softmax
    (transformers does so where sdpa cannot express it: score softcapping, ALiBi as a score bias,
    unscaled scores). Each one eager_attention matches becomes `attention`; the others are returned
    as fallbacks with the reason."""
    out = []
    varying: set[Node] = set()
    for n in g.nodes:  # the nodes whose value depends on the model's inputs (not shapes alone)
        if n.op == "input" or any(i in varying for i in n.inputs):
            varying.add(n)
    users = g.users()
    for n in g.find("softmax"):
        s = n.type.shape
        if not (len(s) >= 2 and n.attrs["dim"] in (-1, len(s) - 1) and s[-1].free_symbols and s[-2].free_symbols):
            continue
        m = eager.match(g, n, varying, users)
        verdict = eager.classify(g, m, lengths, int(m.q.type.shape[1])) if isinstance(m, eager.Match) else m
        if isinstance(m, eager.Match) and isinstance(verdict, tuple):
            (k, rk), (v, rv) = strip_repeat_kv(m.k), strip_repeat_kv(m.v)
            if rk != rv:
                verdict = "keys and values repeat differently"
        if not isinstance(m, eager.Match) or not isinstance(verdict, tuple):
            why = f"attention written as matmul + softmax that kiln does not read: {verdict}"
            out.append({"node": n.name, "source": n.source, "reason": why})
            continue
        window, slopes = verdict
        attrs = {"scale": m.scale, "causal": True, "window": window, "alibi": slopes, "softcap": m.softcap}
        att = g.add("attention", [m.q, k, v], attrs, name="attention", before=m.out, source=n.source)
        new = att
        if m.out.type.rank == 3:  # the model's [batch * heads, tokens, head_dim] layout
            new = g.add("reshape", [att], {"shape": list(m.out.type.shape)}, name="attention_bmm", before=m.out)
        g.replace_all_uses(m.out, new)
        g.nodes.remove(m.out)
        count("attention")
        count("eager-attention")
        if rk > 1:
            count("gqa-repeat-removed")
    return out
