"""shard-tensor-parallel: rank R's part of a model split over N ranks (Megatron-style tensor parallelism).

Each rank holds 1/N of every large weight and runs the same program on its part; two `all_reduce`s
per layer and one `all_gather` of the logits put the parts together (Shoeybi et al., 2019):

- attention: the query heads are split into N contiguous runs; Q/K/V projections are column-parallel
  (their output rows for the rank's heads), the output projection row-parallel (its input columns for
  those heads) and followed by an `all_reduce`. Each rank keeps the KV heads its query heads read:
  Hkv/N of them when N divides Hkv, else the one KV head its query heads share (replicated on the
  ranks of that group). A KV cache input shrinks to the rank's KV heads: each rank holds its heads'
  pages, so the pass runs after kv-cache as well as before it;
- MLP: gate/up (or the first linear of an unfused MLP, through its activation) column-parallel, down
  row-parallel + `all_reduce`; `gated_mlp` is split the same way;
- embedding (the table read by `input_ids`): each rank holds a vocabulary slice; the lookup is masked
  to the rank's ids and summed by an `all_reduce`. LM head: each rank computes its vocabulary slice of
  the logits and an `all_gather` on the last axis joins them. A vocabulary N does not divide is padded
  with zero rows to a multiple of N and the padding sliced off after the gather;
- a bias of a row-parallel layer is added once, after the `all_reduce`; norms, the residual stream and
  everything else are replicated.

Weights are matched by structure (the projections around `attention`/`cached_attention`, linears
joined by channel-wise ops, the output linear), never by name. Quantized weights (`qweight`) are
split on their codes, scales and zeros: rows freely, input columns only on whole quantization groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from kiln.errors import PassError
from kiln.ir import Graph, Node, ttype
from kiln.ops import norm_dim, ops_of_kind, same

from .registry import count, register
from .tp_shard import Shard, contiguous_run, head_rows, index_ranges

_CHANNELWISE = ops_of_kind("unary", "elementwise")
_LOGIT_TAIL = ("mul", "div", "tanh", "cast", "reshape", "slice")  # LM head -> output


def _literal(e: object) -> int | None:
    """A reshape attribute entry as an int when it is a literal number (not a symbolic dim)."""
    if isinstance(e, int):
        return e
    if isinstance(e, sympy.Basic) and e.is_Integer:
        return int(e)
    return None


def _set_last(x: Node, old: int, new: int) -> None:
    """A reshape whose last entry names `old` features: `new` (the rank's)."""
    if x.op == "reshape" and _literal(x.attrs["shape"][-1]) == old:
        x.attrs = {**x.attrs, "shape": list(x.attrs["shape"][:-1]) + [new]}


@dataclass
class _Path:
    """How one attention input comes from its projection. Flat tensors ([.., heads * head_dim], before
    the head reshape) may be reshaped keeping the features last, cast, and cut by one slice of a fused
    QKV projection's output; per-head tensors ([.., heads, .., head_dim], the attention input's rank)
    may be permuted, cast, rotated, normalized per head, and sliced and joined along head_dim (partial
    rotary). Nothing on the path mixes heads, so the rank's heads need only the rank's rows."""

    role: str
    linear: Node
    nodes: list[Node]  # between the projection and the attention
    cut: Node | None  # the slice of a fused projection's output
    offset: int  # where the role's features start in the projection's output


def _inputs_to_follow(att: Node, n: Node, rank: int, role: str) -> list[Node]:
    """The inputs of path node `n` that carry the projection's values, or a PassError saying why `n`
    cannot be on a sharded path."""
    per_head, flat = n.type.rank == rank, n.type.rank < rank
    on_last = "dim" in n.attrs and norm_dim(n.attrs["dim"], n.type.rank) == n.type.rank - 1
    x = n.inputs[0] if n.inputs else None
    if n.op == "cast" or (n.op == "permute" and per_head) or (n.op == "rope" and per_head):
        return [n.inputs[0]]
    if n.op == "reshape" and x is not None and x.type.rank < rank and (per_head or flat):
        if flat and not same(n.type.shape[-1], x.type.shape[-1]):
            raise PassError(
                f"shard-tensor-parallel: %{n.name} reshapes the {role} projection of %{att.name} "
                f"{x.type} -> {n.type} without keeping its features last"
            )
        return [x]
    vary = [i for i in n.inputs if not (i.op == "const" and i.type.rank == 0)]
    if n.op in _CHANNELWISE and len(vary) == 1:  # value by value with scalars (OPT scales its queries)
        return vary
    if n.op == "slice" and on_last and n.attrs["step"] == 1 and (per_head or flat):
        return [n.inputs[0]]
    if n.op == "cat" and on_last and per_head:
        return list(n.inputs)
    if n.op in ("rms_norm", "layer_norm"):
        if per_head and (n.op == "rms_norm" or n.attrs["ndim"] == 1):
            return [n.inputs[0]]
        raise PassError(
            f"shard-tensor-parallel: %{n.name} = {n.op} (from {n.source}) normalizes the {role} of %{att.name} "
            "over all heads together (a qk-norm before the head reshape); a rank holds only its heads, so kiln "
            "does not shard this attention yet"
        )
    raise PassError(
        f"shard-tensor-parallel: the {role} of %{att.name} (from {att.source}) come from %{n.name} = {n.op} "
        f"{n.type}; kiln follows a projection to the attention through reshape, permute, cast, rope, scaling "
        "by a constant, per-head norms, slices and joins along head_dim, and one slice of a fused QKV projection"
    )


def _projection(att: Node, x: Node, role: str) -> _Path:
    rank = x.type.rank
    nodes: list[Node] = []
    seen: set[Node] = set()
    linears: list[Node] = []
    stack = [x]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "linear":
            linears.append(n)
            continue
        stack.extend(_inputs_to_follow(att, n, rank, role))
        nodes.append(n)
    cuts = [n for n in nodes if n.op == "slice" and n.type.rank < rank]
    if len(linears) != 1 or len(cuts) > 1:
        raise PassError(
            f"shard-tensor-parallel: the {role} of %{att.name} come from {len(linears)} projections through "
            f"{len(cuts)} slices of their features; kiln shards one projection per role"
        )
    cut = cuts[0] if cuts else None
    return _Path(role, linears[0], nodes, cut, int(cut.attrs["start"]) if cut is not None else 0)


def _set_heads(path: _Path, heads: int) -> None:
    """The head reshape ([.., features] -> [.., heads, head_dim]) names the rank's head count."""
    for n in path.nodes:
        if n.op == "reshape" and n.type.rank > n.inputs[0].type.rank:
            shape = list(n.attrs["shape"])
            if _literal(shape[-2]) not in (None, -1):
                shape[-2] = heads
                n.attrs = {**n.attrs, "shape": shape}


def _shard_attention(s: Shard, att: Node, users: dict[Node, list[Node]]) -> dict:
    q, k, v = att.inputs[:3]
    H, Hkv, D = int(q.type.shape[1]), int(k.type.shape[1]), int(q.type.shape[3])
    Dv = int(v.type.shape[3])
    n, r = s.ranks, s.rank
    if H % n:
        ok = ", ".join(str(d) for d in range(1, H + 1) if H % d == 0)
        raise PassError(
            f"shard-tensor-parallel: %{att.name} (from {att.source}) has {H} query heads, which {n} ranks do "
            f"not divide; choose ranks among {ok}"
        )
    hq = H // n
    qh = contiguous_run(n, H, r)
    rep = H // Hkv
    if Hkv % n == 0:
        kvh = contiguous_run(n, Hkv, r)
    elif rep % hq == 0:  # fewer KV heads than ranks: the one KV head the rank's query heads share
        kvh = [qh[0] // rep]
        count("kv-heads-replicated")
    else:
        raise PassError(
            f"shard-tensor-parallel: %{att.name} has {H} query heads over {Hkv} KV heads; with {n} ranks a rank's "
            f"{hq} query heads read parts of several KV groups; choose ranks dividing {Hkv}, or a multiple of "
            f"it that divides {H}"
        )
    roles = (("queries", q, qh, D), ("keys", k, kvh, D), ("values", v, kvh, Dv))
    paths = [_projection(att, x, which) for which, x, _, _ in roles]
    on_path = {n for p in paths for n in p.nodes} | {att}
    for p in paths:
        for node in p.nodes + [p.linear]:
            if any(u not in on_path for u in users[node]):
                raise PassError(
                    f"shard-tensor-parallel: %{node.name} (on the {p.role} path of %{att.name}) is read outside "
                    "the attention"
                )
    by_linear: dict[Node, list[tuple[_Path, list[int], int, int]]] = {}
    for p, (which, x, heads, d) in zip(paths, roles):
        width = int(x.type.shape[1]) * d
        got = int((p.cut or p.linear).type.shape[-1])
        if got != width:
            raise PassError(
                f"shard-tensor-parallel: the {which} projection %{p.linear.name} gives {got} features, not "
                f"heads x head_dim = {width}"
            )
        by_linear.setdefault(p.linear, []).append((p, heads, d, width))
    for lin, parts in by_linear.items():
        full = int(lin.type.shape[-1])
        if len(parts) > 1 and any(p.cut is None for p, *_ in parts):
            raise PassError(f"shard-tensor-parallel: %{lin.name} feeds several of q/k/v without slicing its output")
        rows: list[int] = []
        for p, heads, d, _ in sorted(parts, key=lambda t: t[0].offset):
            start = len(rows)
            rows += [p.offset + i for i in head_rows(heads, d)]
            if p.cut is not None:  # the role's features in the rank's (smaller) fused output
                p.cut.attrs = {**p.cut.attrs, "start": start, "end": len(rows)}
            _set_heads(p, len(heads))
        for p, *_ in parts:  # flat reshapes that name the projection's width: the rank's
            for x in p.nodes:
                if x.type.rank < q.type.rank:
                    _set_last(x, full, len(rows))
        fused = len(parts) > 1 or parts[0][0].cut is not None
        role = f"the {'fused QKV' if fused else parts[0][0].role} projection %{lin.name}"
        s.weight(lin.inputs[1], 0, rows, role)
        s.bias(lin.input("bias"), rows, role + " (bias)")
        count("column-parallel")
        if fused:
            count("fused-qkv")
    if att.attrs.get("alibi") is not None:
        slopes = list(att.attrs["alibi"])[qh[0] : qh[-1] + 1]
        att.attrs = {**att.attrs, "alibi": tuple(slopes) if att.op == "attention" else slopes}
    if att.op == "cached_attention":  # the rank's cache (and int8 scales) hold its KV heads' pages
        for c in (att.input("cache"), att.input("scales")):
            if c is not None:
                shape = list(c.type.shape)
                shape[2] = len(kvh)
                c.type = ttype(shape, c.type.dtype)
    # the output: attention -> permute/reshape -> output projection
    x = att
    while True:
        us = users[x]
        if len(us) != 1:
            raise PassError(
                f"shard-tensor-parallel: the output of %{att.name} reaches {len(us)} nodes at %{x.name}; kiln "
                "shards attention whose output reaches one output projection"
            )
        u = us[0]
        if u.op == "linear" and u.inputs[0] is x:
            break
        if u.op not in ("permute", "reshape"):
            raise PassError(
                f"shard-tensor-parallel: the output of %{att.name} reaches %{u.name} = {u.op} before an output "
                "projection"
            )
        _set_last(u, H * Dv, hq * Dv)
        x = u
    s.row_parallel(u, head_rows(qh, Dv), f"the output projection %{u.name}")
    count("row-parallel")
    return {"heads": qh, "kv_heads": kvh, "layer": att.attrs.get("layer")}


def _splittable(s: Shard, lin: Node) -> bool:
    return lin not in s.done and lin.inputs[1] not in s.done and lin.inputs[1].op in ("param", "qweight")


def _ffn_group(s: Shard, down: Node, users: dict[Node, list[Node]]) -> tuple[list[Node], list[Node], list[Node]] | None:
    """The linears whose output channels reach `down`'s input through channel-wise ops only, the
    reshapes in between, and the slices that cut a fused gate/up projection's output into its parts
    (Phi-3); None when down's input is not such a channel group."""
    C = down.inputs[1].type.shape[1]
    seen: set[Node] = set()
    producers: list[Node] = []
    reshapes: list[Node] = []
    cuts: list[Node] = []
    stack = [down.inputs[0]]
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.type.rank == 0 or x.type.shape[-1] != C:
            return None
        last = norm_dim(x.attrs["dim"], x.type.rank) == x.type.rank - 1 if x.op == "slice" else False
        if last and x.attrs["step"] == 1 and x.inputs[0].op == "linear":  # a part of a fused projection
            if not _splittable(s, x.inputs[0]):
                return None
            cuts.append(x)
            if x.inputs[0] not in seen:
                seen.add(x.inputs[0])
                producers.append(x.inputs[0])
            continue
        if x.op == "linear":
            if not _splittable(s, x):
                return None
            producers.append(x)
            continue
        if x.op == "reshape":
            reshapes.append(x)
        elif x.op not in _CHANNELWISE:
            return None
        for o in x.inputs:
            if o.op == "const" and o.type.rank == 0:
                continue
            stack.append(o)
    for x in seen:  # the channels must not leave the group (the residual stream, a norm ...)
        if any(u not in seen and u is not down for u in users[x]):
            return None
    return (producers, reshapes, cuts) if producers else None


def _shard_mlps(s: Shard, users: dict[Node, list[Node]], skip: set[Node]) -> list[str]:
    n, r = s.ranks, s.rank
    done = []
    for m in s.g.find("gated_mlp"):
        F = int(m.inputs[1].type.shape[0])
        if F % n:
            raise PassError(
                f"shard-tensor-parallel: %{m.name} (from {m.source}) has {F} intermediate channels, which {n} ranks "
                "do not divide; choose ranks that divide it"
            )
        idx = contiguous_run(n, F, r)
        s.weight(m.inputs[1], 0, idx, f"the gate projection of %{m.name}")
        s.weight(m.inputs[2], 0, idx, f"the up projection of %{m.name}")
        s.weight(m.inputs[3], 1, idx, f"the down projection of %{m.name}")
        s.all_reduce(m)
        count("gated-mlp")
        done.append(m.name)
    for down in [x for x in s.g.nodes if x.op == "linear"]:
        if down in s.done or down in skip or down.inputs[1] in s.done or down.inputs[1].op not in ("param", "qweight"):
            continue
        found = _ffn_group(s, down, users)
        if found is None:
            continue
        producers, reshapes, cuts = found
        F = int(down.inputs[1].type.shape[1])
        if F % n:
            raise PassError(
                f"shard-tensor-parallel: the MLP into %{down.name} (from {down.source}) has {F} intermediate "
                f"channels, which {n} ranks do not divide; choose ranks that divide it"
            )
        idx = contiguous_run(n, F, r)
        for p in producers:
            rows = idx
            parts = sorted((c for c in cuts if c.inputs[0] is p), key=lambda c: int(c.attrs["start"]))
            if parts:  # the rank's channels of each part, the parts' slices over the smaller output
                rows = []
                for c in parts:
                    start = len(rows)
                    rows += [int(c.attrs["start"]) + i for i in idx]
                    c.attrs = {**c.attrs, "start": start, "end": len(rows)}
                count("fused-gate-up")
            s.weight(p.inputs[1], 0, rows, f"the MLP input projection %{p.name}")
            s.bias(p.input("bias"), rows, f"the MLP input projection bias of %{p.name}")
            s.done.add(p)
        for x in reshapes:
            _set_last(x, F, F // n)
        s.row_parallel(down, idx, f"the MLP output projection %{down.name}")
        s.done.add(down)
        count("mlp")
        done.append(down.name)
    return done


def _token_ids(x: Node) -> bool:
    while x.op == "cast":
        x = x.inputs[0]
    return x.op == "input" and x.name == "input_ids"


def _shard_embedding(s: Shard, e: Node) -> None:
    g = s.g
    w, ids = e.inputs
    V = s.rows(w)
    index, lo, hi = s.vocab(V)
    s.weight(w, 0, index, f"the embedding table %{e.name}")
    dt = ids.type.dtype
    ge = g.add("ge", [ids, g.const(lo, dt, before=e)], before=e)
    lt = g.add("lt", [ids, g.const(hi, dt, before=e)], before=e)
    inside = g.add("and", [ge, lt], name=e.name + "_in_rank", before=e)
    local = g.add("sub", [ids, g.const(lo, dt, before=e)], before=e)
    local = g.add("where", [inside, local, g.const(0, dt, before=e)], name=e.name + "_local_ids", before=e)
    e.inputs = [w, local]

    def make(x: Node) -> Node:
        mask = g.add("unsqueeze", [inside], {"dim": inside.type.rank})
        zero = g.const(0.0, x.type.dtype)
        masked = g.add("where", [mask, x, zero], name=x.name + "_masked")
        return g.add("all_reduce", [masked], {"ranks": s.ranks}, name=x.name + "_allreduce", source=x.source)

    s.after(e, make)
    count("embedding")
    count("all-reduce")


def _lm_head(g: Graph, out: Node) -> Node | None:
    """The linear that produces output `out` through scalar scaling, casts, reshapes and slices."""
    x = out
    while x.op != "linear":
        vary = [i for i in x.inputs if not (i.op == "const" and i.type.rank == 0)]
        if x.op not in _LOGIT_TAIL or len(vary) != 1:
            return None
        x = vary[0]
    return x


def _shard_lm_head(s: Shard, lin: Node) -> None:
    g = s.g
    V = s.rows(lin.inputs[1])
    index, _, _ = s.vocab(V)
    s.weight(lin.inputs[1], 0, index, f"the LM head %{lin.name}")
    s.bias(lin.input("bias"), index, f"the LM head bias of %{lin.name}")
    s.done.add(lin)
    last = lin.type.rank - 1

    def make(x: Node) -> Node:
        y = g.add("all_gather", [x], {"ranks": s.ranks, "dim": last}, name=x.name + "_allgather", source=x.source)
        if len(index) * s.ranks != V:  # drop the padding rows' logits
            y = g.add("slice", [y], {"dim": last, "start": 0, "end": V}, name=x.name + "_vocab")
        return y

    s.after(lin, make)
    count("lm-head")
    count("all-gather")


def _update_kv_meta(g: Graph, layers: list[dict]) -> None:
    kv = g.meta.get("kv_cache")
    if not kv:
        return
    for lay in layers:
        i = lay["layer"]
        if i is None or i >= len(kv["layers"]):
            continue
        kv["layers"][i]["kv_heads"] = len(lay["kv_heads"])
        kv["layers"][i]["num_heads"] = len(lay["heads"])
    shapes = {n.name: n.type.shape for n in g.inputs}
    for t in kv.get("tensors", []):
        if t["name"] in shapes:
            t["shape"] = [str(d) for d in shapes[t["name"]]]


@register("shard-tensor-parallel", phase="shard")
def shard_tensor_parallel(graph: Graph, ranks: int = 1, rank: int = 0) -> Graph:
    """Matches: every `attention`/`cached_attention` with its q/k/v projections (linear -> reshape ->
    permute [-> rope]) and output projection, `gated_mlp`s and MLPs of linears joined by channel-wise
    ops, the embedding read by `input_ids`, and the output linear (the LM head). Run it after
    fuse-attention, and after kv-cache to shard the cached program (each rank's cache holds its KV heads).
    Guarantees: rank `rank`'s graph of a group of `ranks`: column-parallel Q/K/V and MLP input
    projections, row-parallel output and MLP output projections each followed by one `all_reduce`
    (then their bias), a vocabulary-split embedding (masked lookup + `all_reduce`) and LM head (its
    logit slice + one `all_gather`, padding dropped), KV heads split or replicated as the query heads
    need them. graph.meta['tensor_parallel'] records the group and how every weight was split. The
    ranks' outputs together equal the unsharded graph's up to the order of floating-point sums (exact
    in value, not bitwise). ranks=1 returns the graph unchanged."""
    ranks, rank = int(ranks), int(rank)
    if ranks < 1 or not 0 <= rank < ranks:
        raise PassError(f"shard-tensor-parallel: need ranks >= 1 and 0 <= rank < ranks, got ranks={ranks} rank={rank}")
    if ranks == 1:
        return graph.copy()
    if graph.find("mla_attention") or graph.find("cached_mla_attention"):
        raise PassError("shard-tensor-parallel: latent attention (convert-mla) is not sharded yet")
    atts = [n for n in graph.nodes if n.op in ("attention", "cached_attention")]
    if not atts:
        raise PassError("shard-tensor-parallel: the graph has no recognized attention; run fuse-attention first")
    if graph.find("all_reduce") or graph.find("all_gather"):
        raise PassError("shard-tensor-parallel: the graph is sharded already")
    g = graph.copy()
    s = Shard(g, ranks, rank)
    users = g.users()
    layers = [_shard_attention(s, a, users) for a in [n for n in g.nodes if n.op in ("attention", "cached_attention")]]
    heads = [lin for o in g.outputs if (lin := _lm_head(g, o)) is not None]
    users = g.users()
    mlps = _shard_mlps(s, users, set(heads))
    for e in [n for n in g.nodes if n.op == "embedding" and _token_ids(n.inputs[1])]:
        _shard_embedding(s, e)
    for lin in heads:
        if lin not in s.done:
            _shard_lm_head(s, lin)
    g.toposort()  # the collectives were appended at the end: order first, or dce misses their inputs
    g.dce()
    g.reinfer()
    _update_kv_meta(g, layers)
    weights = {}
    for name, spec in s.specs.items():
        idx = spec["index"]
        real = [i for i in idx if i >= 0]
        weights[name] = {
            "split": "rows" if spec["axis"] == 0 else "columns",
            "axis": spec["axis"],
            "ranges": index_ranges(real),
            "pad": len(idx) - len(real),
            "role": spec["role"],
        }
    for name in g.params:
        weights.setdefault(name, {"split": "replicated"})
    g.meta["tensor_parallel"] = {
        "ranks": ranks,
        "rank": rank,
        "layers": [{"heads": lay["heads"], "kv_heads": lay["kv_heads"]} for lay in layers],
        "mlps": mlps,
        "weights": weights,
    }
    return g
