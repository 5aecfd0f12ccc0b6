"""Attention written as matmul + softmax (transformers' "eager" attention), matched exactly.

transformers writes attention out where `scaled_dot_product_attention` cannot express it: Gemma-2
softcaps the scores with tanh, Bloom adds its ALiBi bias with baddbmm, GPT-Neo leaves the scores
unscaled and masks local layers with a `where`. The structure is the same in all of them:

    scores = matmul(q, k^T)                           # [B, H, T, T] or [B*H, T, T]
    scores = scores * scale                           # scalar muls / divs
    scores = softcap * tanh(scores / softcap)         # optional
    scores = scores + bias | where(keep, scores, min) # terms built from shapes alone (mask, ALiBi)
    out = matmul(softmax(scores), v)

The chain is checked structurally; the additive terms are then evaluated with the q k^T product
replaced by zeros, which yields exactly the bias a query row adds to its keys. That bias must be a
causal (or sliding-window) mask plus, optionally, slope[h] * (j - i) per head (ALiBi; a constant per
row, as in Bloom's slope * j, is the same thing to softmax).
"""

from __future__ import annotations

import torch

from kiln.interp import evaluate_subgraph
from kiln.ir import Graph, Node
from kiln.ops import same

_PASS = ("reshape", "cast")  # ops the score chain may pass through unchanged
_BIG_NEG = -1e30  # a score at or below this is masked (models use finfo.min, or -inf)
_MAX_ELEMS = 1 << 26  # largest score tensor evaluated to classify the bias (256 MiB of fp32)


class Match:
    """One eager attention: its q, k, v ([batch, heads, tokens, head_dim], k/v as the model repeats
    them for GQA), the output matmul to replace, the q k^T matmul, the scores softmax reads, and the
    scale and softcap read from the chain between them."""

    def __init__(self, out: Node, qk: Node, scores: Node, q: Node, k: Node, v: Node) -> None:
        self.out, self.qk, self.scores = out, qk, scores
        self.q, self.k, self.v = q, k, v
        self.scale = 1.0
        self.softcap = 0.0


def _heads(x: Node) -> Node | None:
    """x as [B, H, T, D]: itself, or the source of its reshape to [B*H, T, D] (Bloom's bmm layout)."""
    if x.type.rank == 4:
        return x
    if x.type.rank == 3 and x.op == "reshape" and x.inputs[0].type.rank == 4:
        s, (b, h, t, d) = x.type.shape, x.inputs[0].type.shape
        if same(s[0], b * h) and same(s[1], t) and same(s[2], d):
            return x.inputs[0]
    return None


def _scalar(g: Graph, n: Node) -> float | None:
    """The value of a rank-0 constant or parameter, or None."""
    if n.type.rank != 0 or n.op not in ("const", "param", "full"):
        return None
    return float(evaluate_subgraph(g, n, {}))


def match(g: Graph, sm: Node, varying: set[Node], users: dict[Node, list[Node]]) -> Match | str:
    """The eager attention around softmax `sm`, or why it is not one."""
    if sm.type.rank not in (3, 4) or sm.attrs["dim"] not in (-1, sm.type.rank - 1):
        return "the softmax is not over the last axis of a [.., tokens, tokens] score matrix"
    # output side: softmax (-> reshape/cast) -> matmul(p, v)
    p = sm
    while len(users.get(p, [])) == 1 and users[p][0].op in _PASS:
        p = users[p][0]
    pv = users.get(p, [])
    if len(pv) != 1 or pv[0].op != "matmul" or pv[0].inputs[0] is not p:
        return "the attention weights are used other than by one matmul with the values"
    out = pv[0]
    v = _heads(out.inputs[1])
    # score side: walk back from the softmax's input to the q k^T matmul
    chain: list[Node] = []
    x = sm.inputs[0]
    while x.op != "matmul":
        on_path = [i for i in x.inputs if i in varying]
        if len(on_path) != 1 or len(users.get(x, [])) != 1:
            return f"the scores pass through %{x.name} = {x.op}, which is not a scalar or bias step"
        chain.append(x)
        x = on_path[0]
    qk = x
    if len(users.get(qk, [])) != 1:
        return "the raw scores q k^T are used more than once"
    kt = qk.inputs[1]
    r = kt.type.rank
    if kt.op != "permute" or list(kt.attrs["perm"]) != list(range(r - 2)) + [r - 1, r - 2]:
        return "the keys are not transposed in the last two axes"
    q, k = _heads(qk.inputs[0]), _heads(kt.inputs[0])
    if q is None or k is None or v is None:
        return "q, k or v is not a per-head [batch, heads, tokens, head_dim] tensor"
    m = Match(out, qk, sm.inputs[0], q, k, v)
    why = _read_chain(g, chain[::-1], m)
    return why if why else m


def _read_chain(g: Graph, chain: list[Node], m: Match) -> str | None:
    """Scale and softcap from the chain (first op after q k^T first); None when it is one we can serve."""
    factors: list[tuple[Node, float]] = []  # scalar steps before any bias, as multipliers
    biased = capped = False
    i = 0
    while i < len(chain):
        n = chain[i]
        other = [x for x in n.inputs if x is not chain[i - 1]] if i else [x for x in n.inputs if x is not m.qk]
        c = _scalar(g, other[0]) if n.op in ("mul", "div") and len(other) == 1 else None
        if n.op in _PASS:
            pass
        elif c is not None and c != 0 and not biased and not capped:
            if n.op == "div" and n.inputs[0] not in other:
                factors.append((n, 1.0 / c))
            elif n.op == "mul":
                factors.append((n, c))
            else:
                return f"%{n.name} divides a constant by the scores"
        elif n.op == "tanh" and not biased and not capped and factors and i + 1 < len(chain):
            nxt = chain[i + 1]
            cap = _scalar(g, next(x for x in nxt.inputs if x is not n)) if nxt.op == "mul" else None
            if cap is None or abs(factors[-1][1] * cap - 1.0) > 1e-6:
                return "a tanh of the scores that is not softcap * tanh(scores / softcap)"
            m.softcap = cap
            capped = True
            factors.pop()
            i += 1
        elif n.op in ("add", "where", "sub"):
            if n.op == "where" and n.inputs[1] is not (chain[i - 1] if i else m.qk):
                return f"%{n.name} masks the scores in a form kiln does not read"
            if n.op == "sub" and n.inputs[0] is not (chain[i - 1] if i else m.qk):
                return f"%{n.name} subtracts the scores from a bias"
            biased = True
        else:
            return f"the scores pass through %{n.name} = {n.op}, which is not a scalar or bias step"
        i += 1
    scale = 1.0
    for _, f in factors:
        scale *= f
    m.scale = scale
    return None


def classify(g: Graph, m: Match, lengths: tuple[int, ...], heads: int) -> tuple[int, tuple | None] | str:
    """(window, ALiBi slopes or None) of the bias the chain adds to q k^T, or why it is not servable."""
    probe = g.copy()
    by_name = {n.name: n for n in probe.nodes}
    qk = by_name[m.qk.name]
    zero = probe.add(
        "full", [], {"shape": list(qk.type.shape), "value": 0.0, "dtype": qk.type.dtype}, name="zeros", before=qk
    )
    probe.replace_all_uses(qk, zero)
    scores = by_name[m.scores.name]
    window, slopes = 0, None
    for t in lengths:
        if heads * t * t > _MAX_ELEMS:
            continue
        try:
            b = evaluate_subgraph(probe, scores, {"batch": 1, "tokens": t}).float()
        except Exception as e:  # a bias kiln cannot evaluate from shapes alone
            return f"its score bias does not evaluate from shapes alone ({type(e).__name__})"
        b = b.reshape(-1, t, t)
        if b.shape[0] not in (1, heads):
            return f"its score bias has {b.shape[0]} rows per sequence for {heads} heads"
        keep = b > _BIG_NEG
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        allowed = int(keep[0, -1].sum())
        ref = j <= i
        if allowed < t:
            window = allowed if window in (0, allowed) else -1
            ref = ref & (j > i - allowed)
        if window < 0 or not bool((keep == ref).all()) or (0 < window < 2):
            return "its mask is not causal or sliding-window"
        rel = (b - b.diagonal(dim1=-2, dim2=-1)[:, :, None]).masked_fill(~keep, 0.0)  # bias relative to key i
        lo = max(0, t - window) if window else 0
        s = (rel[:, -1, lo] / (lo - (t - 1))).double()  # slope from the last row's first visible key
        want = (s[:, None, None] * (j - i)).masked_fill(~keep, 0.0)
        tol = 1e-5 * (1.0 + float(rel.abs().max()))
        if not bool(((rel.double() - want).abs() <= tol).all()):
            return "its score bias is neither a mask nor ALiBi (slope[h] * (j - i))"
        got = tuple(float(x) for x in s.float()) if bool((s.abs() > 0).any()) else None
        if got is not None and len(got) == 1:
            got = got * heads
        if slopes is not None and (got is None or any(abs(a - c) > 1e-6 * (1 + abs(a)) for a, c in zip(slopes, got))):
            return "its ALiBi slopes change with the sequence length"
        slopes = got
    return window, slopes
