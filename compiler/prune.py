"""Structured pruning on the IR: dependency groups and importance criteria.

Dependency groups follow the DepGraph idea (Fang et al., 2023): removing one channel of a weight
forces the removal of the coupled slices of every other weight that reads or writes the same channel,
and the shape attributes between them must follow. kiln finds the groups on the graph itself:

- FFN channels: starting at a linear layer's output, channels propagate through elementwise ops (the
  activation, the gate-times-up product, GeLU's polynomial) until they reach linear layers that read
  them. The producers lose rows (and bias entries), the consumers lose columns. A value that reaches
  anything else (a norm, the residual stream, a reshape) is not an FFN channel group.
- attention heads: q/k/v projections -> reshape to [.., heads, head_dim] -> permute -> rope ->
  `attention` -> permute -> reshape -> output projection. With GQA, a query head h reads KV head
  h // (H / Hkv), so a pruning either removes whole KV groups (the KV head and its query heads) or the
  same number of query heads from every group; reshape shape attributes that name head counts follow.
- layers: the residual stream is the chain of `add`s whose one input is an ancestor of the other; a
  layer is an attention sublayer and the sublayer after it. Removing a layer maps its output to its input.

Importance of a slice, summed over the weights of a group:
- magnitude: |W|;
- wanda: |W| * ||X_j|| with X the linear layer's input on calibration text (Sun et al., 2023);
- taylor: |W * dL/dW| with L the next-token loss on calibration text (first order, as in LLM-Pruner,
  Ma et al., 2023).
Layers rank by block influence, 1 - cos(input, output) of the block (ShortGPT, Men et al., 2024).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import interp
from .errors import PassError
from .ir import Graph, Node, ttype
from .log import get, step
from .ops import ops_of_kind

log = get("prune")

# ops through which a channel stays the same channel: value by value, operands broadcast
_CHANNELWISE = ops_of_kind("unary", "elementwise")


@dataclass
class Slice:
    """Slices of `param` along `axis`: channel c owns indices [c*width, (c+1)*width)."""

    param: str
    axis: int
    width: int = 1
    reader: Node | None = None  # the linear layer that reads this weight (for wanda's input norms)


@dataclass
class ChannelGroup:
    """FFN channels: every slice shrinks together."""

    layer: int
    size: int
    slices: list[Slice]
    reshapes: list[Node] = field(default_factory=list)  # channel-preserving reshapes whose last attr follows


@dataclass
class HeadGroup:
    """One attention op's heads: query slices (per query head) and KV slices (per KV head)."""

    layer: int
    attention: Node
    heads: int
    kv_heads: int
    head_dim: int
    q: list[Slice]  # query projection rows (+ bias), output projection columns
    kv: list[Slice]  # key and value projection rows (+ biases)
    reshapes: list[tuple[Node, int, str]] = field(default_factory=list)  # (node, attr index, "q"|"kv"|"o")


# -- dependency analysis ---------------------------------------------------------------------------


def _linear_w(n: Node) -> bool:
    return n.op == "linear" and n.inputs[1].op == "param"


def ffn_groups(g: Graph) -> list[ChannelGroup]:
    """Channel groups whose channels live only between linear layers (FFN hidden units)."""
    if g.find("gated_mlp"):
        raise PassError("FFN pruning reads each MLP's structure and activations: run it before fuse-mlp")
    users = g.users()
    seen: set[Node] = set()
    groups: list[ChannelGroup] = []
    for start in g.nodes:
        if not _linear_w(start) or start in seen or not start.type.shape[-1].is_Integer:
            continue
        C = start.type.shape[-1]
        values, producers, consumers, params, reshapes = {start}, {start}, [], set(), []
        stack, ok, pending = [start], True, []
        while stack and ok:
            v = stack.pop()
            for u in users.get(v, []):
                if u in values or u in consumers:
                    continue
                if u.op == "linear" and u.inputs[0] is v and u.inputs[1].op == "param" and v not in u.inputs[1:]:
                    consumers.append(u)
                elif u.op == "reshape" and u.type.rank >= 1 and u.type.shape[-1] == C:  # leading dims only
                    values.add(u)
                    reshapes.append(u)
                    stack.append(u)
                elif u.op in _CHANNELWISE and u.type.rank >= 1 and u.type.shape[-1] == C:
                    values.add(u)
                    stack.append(u)
                    for o in u.inputs:  # the other operands carry the same channels (or broadcast)
                        if o in values or o.type.rank == 0 or o.type.shape[-1] == 1:
                            continue
                        if o.type.shape[-1] != C:
                            ok = False
                        elif _linear_w(o):
                            values.add(o)
                            producers.add(o)
                            stack.append(o)
                        elif o.op == "param" and o.type.rank == 1:
                            params.add(o.attrs["name"])
                        elif o.op == "const":
                            continue
                        else:
                            pending.append(o)  # must turn out to carry the group's channels too
                else:
                    ok = False
                    break
        seen |= producers
        if not ok or not consumers or any(o not in values for o in pending):
            continue
        slices = []
        for p in sorted(producers, key=g.nodes.index):
            slices.append(Slice(p.inputs[1].attrs["name"], 0, 1, p))
            bias = p.input("bias")
            if bias is not None:
                slices.append(Slice(bias.attrs["name"], 0))
        slices += [Slice(n, 0) for n in sorted(params)]
        slices += [Slice(c.inputs[1].attrs["name"], 1, 1, c) for c in consumers]
        groups.append(ChannelGroup(len(groups), int(C), slices, reshapes))
    return groups


def _chain_back(x: Node, users: dict, stop: Node) -> tuple[Node, list[Node]]:
    """From an attention input back to its projection: returns (linear, nodes in between)."""
    chain: list[Node] = []
    while not _linear_w(x):
        if len([u for u in users.get(x, []) if u is not stop]) > 1 and chain:
            raise PassError(f"head pruning: %{x.name} ({x.op}) feeds more than the attention")
        if x.op == "rope" or x.op in ("permute", "reshape", "rms_norm"):
            chain.append(x)
            stop, x = x, x.inputs[0]
        else:
            raise PassError(
                f"head pruning: cannot follow %{x.name} = {x.op} back to a q/k/v projection "
                f"(from {x.source}); kiln prunes heads of separate q/k/v linear layers"
            )
    return x, chain


def head_groups(g: Graph) -> list[HeadGroup]:
    """One HeadGroup per `attention` op (run fuse-attention first)."""
    atts = g.find("attention")
    if not atts:
        raise PassError("head pruning needs recognized attention: run fuse-attention first")
    users = g.users()
    out = []
    for i, a in enumerate(atts):
        q, k, v = a.inputs
        H, Hkv, D = int(q.type.shape[1]), int(k.type.shape[1]), int(q.type.shape[3])
        group = HeadGroup(i, a, H, Hkv, D, [], [])
        for which, x in (("q", q), ("kv", k), ("kv", v)):
            lin, chain = _chain_back(x, users, a)
            if int(lin.type.shape[-1]) != (H if which == "q" else Hkv) * D:
                raise PassError(
                    f"head pruning: projection %{lin.name} has {lin.type.shape[-1]} outputs, not heads x "
                    f"head_dim = {(H if which == 'q' else Hkv) * D}"
                )
            dst = group.q if which == "q" else group.kv
            dst.append(Slice(lin.inputs[1].attrs["name"], 0, D, lin))
            bias = lin.input("bias")
            if bias is not None:
                dst.append(Slice(bias.attrs["name"], 0, D))
            for n in chain:
                if n.op == "reshape":
                    group.reshapes.append((n, len(n.attrs["shape"]) - 2, which))
        # output: attention -> permute -> reshape -> linear
        x, o = a, None
        while o is None:
            us = users.get(x, [])
            if len(us) != 1:
                raise PassError(
                    f"head pruning: the attention output %{x.name} has {len(us)} users; expected one path "
                    "to the output projection"
                )
            u = us[0]
            if _linear_w(u) and u.inputs[0] is x:
                o = u
            elif u.op in ("permute", "reshape"):
                if u.op == "reshape":
                    group.reshapes.append((u, len(u.attrs["shape"]) - 1, "o"))
                x = u
            else:
                raise PassError(f"head pruning: cannot follow the attention output through %{u.name} = {u.op}")
        group.q.append(Slice(o.inputs[1].attrs["name"], 1, D, o))
        out.append(group)
    return out


@dataclass
class Block:
    layer: int
    input: Node  # residual value entering the layer
    output: Node  # residual value leaving it


def layer_blocks(g: Graph) -> list[Block]:
    """Transformer layers as (input, output) of the residual stream."""
    out = g.outputs[0]
    x = out
    while x.op not in ("add",) and x.inputs:  # back from the logits to the last residual add
        x = x.inputs[0]
    stream = []
    while x.op == "add" and len(x.inputs) == 2:
        a, b = x.inputs
        if a in g.ancestors(b):
            prev = a
        elif b in g.ancestors(a):
            prev = b
        else:
            break
        stream.append(x)
        x = prev
    stream.append(x)
    stream.reverse()  # s_0 (embedding) ... s_2L
    atts = set(g.find("attention"))
    blocks: list[Block] = []
    i = 0
    while i + 1 < len(stream):
        delta = g.ancestors(stream[i + 1]) - g.ancestors(stream[i]) - {stream[i]}
        if not (delta & atts):
            raise PassError(
                f"layer pruning: residual add %{stream[i + 1].name} does not follow an attention sublayer; "
                "kiln removes layers of sequential attention + MLP blocks"
            )
        if i + 2 >= len(stream):
            raise PassError("layer pruning: the last attention sublayer has no MLP sublayer after it")
        blocks.append(Block(len(blocks), stream[i], stream[i + 2]))
        i += 2
    if len(blocks) != len(atts):
        raise PassError(
            f"layer pruning: found {len(blocks)} residual blocks for {len(atts)} attention ops; the model "
            "does not have the sequential residual structure kiln can remove layers from"
        )
    return blocks


# -- importance ------------------------------------------------------------------------------------

CRITERIA = ("magnitude", "wanda", "taylor")


@dataclass
class Evidence:
    """What the criteria read: input norms of linear layers, gradients of parameters."""

    norms: dict[Node, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)


def gather_evidence(g: Graph, criterion: str, readers: list[Node], windows: int = 4) -> Evidence:
    if criterion not in CRITERIA:
        raise PassError(f"criterion must be one of {', '.join(CRITERIA)}, got '{criterion}'")
    ev = Evidence()
    if criterion == "magnitude":
        return ev
    tokens = g.meta.get("calib_tokens")
    if not tokens:
        raise PassError(
            f"criterion={criterion} reads calibration text: pass calib=... to kiln.compile (--calib on the "
            "command line), or use criterion=magnitude"
        )
    tokens = tokens[: int(windows)]
    if criterion == "wanda":
        want = {r.inputs[0]: r for r in readers}
        sq: dict[Node, torch.Tensor] = {}

        def observe(node, value):
            if node in want:
                s = value.detach().reshape(-1, value.shape[-1]).float().pow(2).sum(0)
                sq[node] = sq[node] + s if node in sq else s

        for i, w in enumerate(tokens, 1):
            interp.run(g, {"input_ids": torch.tensor([w])}, observe=observe)
            step(log, "wanda: calibration window", i, len(tokens))
        ev.norms = {r: sq[r.inputs[0]].sqrt() for r in readers}
        return ev
    names = {n for n, t in g.params.items() if t.is_floating_point()}
    params = {n: (t.detach().clone().requires_grad_(True) if n in names else t) for n, t in g.params.items()}
    for i, w in enumerate(tokens, 1):
        step(log, f"{criterion}: gradient window", i, len(tokens))
        logits = interp.run(g, {"input_ids": torch.tensor([w])}, params=params, grad=True)[0][0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]))
        loss.backward()
    ev.grads = {n: params[n].grad for n in names if params[n].grad is not None}
    return ev


def slice_scores(g: Graph, s: Slice, ev: Evidence, criterion: str) -> torch.Tensor:
    """Score of every channel of one slice: [channels]."""
    w = g.params[s.param].detach().float()
    if criterion == "taylor":
        grad = ev.grads.get(s.param)
        e = (w * grad).abs() if grad is not None else torch.zeros_like(w)
    elif criterion == "wanda":
        if s.reader is None:
            return torch.zeros(w.shape[s.axis] // s.width)  # biases and norm weights: no input to weigh
        e = w.abs() * ev.norms[s.reader][None, :]
    else:
        e = w.abs()
    e = e.movedim(s.axis, 0).reshape(w.shape[s.axis] // s.width, -1)
    return e.sum(1)


def group_scores(g: Graph, slices: list[Slice], ev: Evidence, criterion: str) -> torch.Tensor:
    # a group always has its projection weight, so there is a first score to add the others to
    scores = [slice_scores(g, s, ev, criterion) for s in slices]
    return sum(scores[1:], scores[0])


# -- rewriting -------------------------------------------------------------------------------------


def keep_slices(g: Graph, s: Slice, keep: list[int]) -> None:
    """Keep only channels `keep` of slice `s` (copy-on-write; the param node's type follows)."""
    t = g.params[s.param]
    idx = torch.tensor([c * s.width + j for c in keep for j in range(s.width)], dtype=torch.long)
    g.params[s.param] = t.index_select(s.axis, idx).contiguous()
    for n in g.nodes:
        if n.op == "param" and n.attrs["name"] == s.param:
            n.type = ttype(tuple(g.params[s.param].shape), n.type.dtype)


def block_influence(g: Graph, blocks: list[Block], windows: int = 4) -> list[float]:
    """1 - mean cosine similarity between each block's input and output hidden states."""
    tokens = g.meta.get("calib_tokens")
    if not tokens:
        raise PassError(
            "prune-layers reads calibration text to measure block influence: pass calib=... to "
            "kiln.compile (--calib on the command line)"
        )
    want = {b.input for b in blocks} | {b.output for b in blocks}
    sims = [0.0] * len(blocks)
    count = 0
    for wi, w in enumerate(tokens[: int(windows)], 1):
        step(log, "block influence: window", wi, len(tokens[: int(windows)]))
        seen: dict[Node, torch.Tensor] = {}

        def observe(node, value):
            if node in want:
                seen[node] = value.detach().reshape(-1, value.shape[-1]).float()

        interp.run(g, {"input_ids": torch.tensor([w])}, observe=observe)
        for i, b in enumerate(blocks):
            sims[i] += float(torch.nn.functional.cosine_similarity(seen[b.input], seen[b.output], dim=-1).sum())
        count += len(w)
    return [1.0 - s / count for s in sims]


def parse_ratio(ratio, layers: int, who: str) -> list[float] | float:
    """A ratio in [0, 1), or one per layer separated by '/' ("0.1/0.3/0.2/0.2")."""
    items = str(ratio).split("/") if isinstance(ratio, str) else [ratio]
    try:
        vals = [float(x) for x in items]
    except ValueError:
        raise PassError(
            f"{who}: ratio must be a number in [0, 1) or one per layer like 0.1/0.3, got {ratio!r}"
        ) from None
    for v in vals:
        if not 0.0 <= v < 1.0:
            raise PassError(
                f"{who}: ratio {v} is outside [0, 1); 0 keeps everything, and a ratio of 1 would remove "
                "every unit (to drop whole layers use prune-layers)"
            )
    if len(vals) == 1 and not isinstance(ratio, str) or len(vals) == 1 and "/" not in str(ratio):
        return vals[0]
    if len(vals) != layers:
        raise PassError(
            f"{who}: {len(vals)} per-layer ratios for {layers} layers; give one per layer or a single ratio"
        )
    return vals


def counts_to_remove(
    unit_scores: list[torch.Tensor], ratio, unit_cost: list[int], total: list[int], scope: str, who: str
) -> list[int]:
    """How many units (lowest scores first) each layer loses. `unit_scores[l]` is ascending over the
    removable units of layer l; `unit_cost[l]` is the channels or heads one unit holds."""
    L = len(unit_scores)
    if isinstance(ratio, list) or scope == "layer":
        rs = ratio if isinstance(ratio, list) else [ratio] * L
        return [min(len(unit_scores[i]), int(round(rs[i] * total[i] / unit_cost[i]))) for i in range(L)]
    if scope != "global":
        raise PassError(f"{who}: scope must be 'layer' or 'global', got {scope!r}")
    target = ratio * sum(total)
    cand = []
    for i, s in enumerate(unit_scores):
        norm = float(s.mean()) if len(s) and float(s.mean()) > 0 else 1.0
        cand += [(float(v) / norm, i) for v in s]
    cand.sort()
    out, removed = [0] * L, 0.0
    for _, i in cand:
        if removed + unit_cost[i] / 2 > target:
            break
        out[i] += 1
        removed += unit_cost[i]
    return out


def param_count(g: Graph) -> int:
    return sum(int(t.numel()) for t in g.params.values())
