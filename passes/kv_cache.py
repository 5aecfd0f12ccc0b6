"""kv-cache: derive the incremental program from the full-sequence trace.

The traced forward recomputes every token; serving needs `prefill` (a prompt chunk) and `decode`
(one new token per sequence) that read and append to a KV cache. This pass makes the change once,
for any decoder-only model whose attention was recognized:

- positions become an input: the trace's position ids (`arange(tokens)` broadcast over the batch)
  are replaced by `positions [batch, tokens]`, so rotary/learned position embeddings follow;
- each `attention(q, k, v)` becomes `cached_attention(q, k, v, cache_i, page_table, positions)`,
  which writes k/v into layer i's paged cache and attends over everything cached for the sequence;
- each state-space op (`selective_scan`, `causal_conv1d`) becomes its cached form over a fixed-size
  state per sequence (state_cache.py); a model may have attention, recurrent layers, or both;
- optionally only the last token's logits are computed (what generation needs).

The entry points are the same graph at different symbolic shapes: prefill binds `batch=1`, decode
binds `tokens=1`, verify binds neither and keeps every token's logits (the slice marked `last_token`
is the one thing an entry point may drop).
"""

from __future__ import annotations

import sympy
import torch

from kiln.entry import default_entry_points
from kiln.errors import PassError
from kiln.interp import evaluate_subgraph
from kiln.ir import Graph, Node, TensorType, sym
from kiln.ops import same

from .latent_cache import cache_mla
from .registry import count, register
from .state_cache import RECURRENT, derive_states

BATCH, TOKENS, PAGES, MAX_PAGES = sym("batch"), sym("tokens"), sym("pages"), sym("max_pages")


def _replace_positions(g: Graph, positions) -> None:
    pos64 = None
    for a in g.find("arange"):
        if not (a.attrs["start"] == 0 and sympy.sympify(a.attrs["end"]) == TOKENS and a.attrs["step"] == 1):
            raise PassError(
                f"kv-cache: %{a.name} = arange({a.attrs['start']}, {a.attrs['end']}) is not a position "
                f"range over tokens (from {a.source}); kiln cannot tell what it means incrementally"
            )
        users = [u for u in g.nodes if a in u.inputs]
        for u in users:
            if u.op == "unsqueeze" and u.attrs["dim"] == 0:
                if pos64 is None:
                    pos64 = g.add("cast", [positions], {"dtype": a.type.dtype}, name="position_ids", before=u)
                g.replace_all_uses(u, pos64)
                count("positions")
            else:
                raise PassError(
                    f"kv-cache: the position range %{a.name} is used by %{u.name} = {u.op} "
                    f"(from {u.source}) as a [tokens] vector; kiln needs [batch, tokens] position ids"
                )
    if pos64 is not None:
        _follow_batch(g, pos64)
    _replace_computed_positions(g, positions)
    g.dce()


def _replace_computed_positions(g: Graph, positions: Node) -> None:
    """Position ids the model computes from shapes rather than from an arange: OPT takes
    cumsum(ones(batch, tokens)) - 1 (its attention mask's cumsum, the mask being all ones in the trace).
    An integer [batch, tokens] tensor built from shapes alone that equals 0..tokens-1 in every row at
    two probe lengths is that, and becomes the per-sequence positions (in the full-sequence program
    it is exactly that: the token index)."""
    varying: set[Node] = set()
    for n in g.nodes:
        if n.op == "input" or any(i in varying for i in n.inputs):
            varying.add(n)
    for n in list(g.nodes):
        t = n.type
        if n in varying or n.op in ("const", "param") or t.rank != 2 or not t.dtype.startswith(("int", "uint")):
            continue
        if not (same(t.shape[0], BATCH) and same(t.shape[1], TOKENS)):
            continue
        if all(_is_arange(g, n, tokens) for tokens in (9, 17)):
            pos = g.add("cast", [positions], {"dtype": t.dtype}, name="position_ids", before=n)
            g.replace_all_uses(n, pos)
            varying.add(pos)
            count("positions")


def _is_arange(g: Graph, n: Node, tokens: int) -> bool:
    try:
        v = evaluate_subgraph(g, n, {"batch": 2, "tokens": tokens})
    except Exception:  # not evaluable from shapes alone: not a position range kiln can read
        return False
    return bool((v == torch.arange(tokens)).all())


def _follow_batch(g: Graph, pos: Node) -> None:
    """Give the ops after the position ids the batch the trace's [1, tokens] ids did not have.

    A rotary table gathered by position ids of batch 1 may be reshaped or expanded with a literal 1 in
    front (GPT-J's interleaved rotary repeats each frequency twice: expand to [1, tokens, 1, n, 2],
    reshape to [1, tokens, 1, 2n]); with per-sequence positions that leading axis is the batch, so such
    a 1 becomes the batch of the op's input. Other shapes are left for type inference to check."""
    from kiln.ops import infer_type

    after = {pos}
    for n in g.nodes:
        if n is pos or not any(i in after for i in n.inputs):
            continue
        after.add(n)
        src = n.inputs[0].type.shape
        if n.op in ("expand", "reshape") and src and not same(src[0], 1):
            shape = list(n.attrs["shape"])
            rest_in, rest_out = sympy.Mul(*src[1:]), sympy.Mul(*[sympy.sympify(d) for d in shape[1:]])
            leading = len(shape) == len(src) or n.op == "reshape"
            if leading and shape[0] == 1 and (n.op == "expand" or (-1 not in shape and same(rest_in, rest_out))):
                n.attrs = {**n.attrs, "shape": [src[0]] + shape[1:]}
                count("positions-batch")
        n.type = infer_type(n.op, n.inputs, n.attrs)


_SCALAR_TAIL = ("mul", "div", "tanh", "cast")


def _head_and_tail(out: Node) -> tuple[Node | None, list[Node]]:
    """The LM head linear under the output and the elementwise ops after it, first to last: ops with
    scalar constants only (Cohere's logit scale, Granite's division, Gemma-2's tanh softcapping)."""
    tail: list[Node] = []
    o = out
    while o.op != "linear":
        vary = [i for i in o.inputs if not (i.op == "const" and i.type.rank == 0)]
        if o.op not in _SCALAR_TAIL or len(vary) != 1:
            return None, []
        tail.append(o)
        o = vary[0]
    return o, tail[::-1]


def describe_fallbacks(graph: Graph) -> str:
    """The attention layers fuse-attention left as plain ops (`meta["attention_fallbacks"]`), a line each."""
    fb = graph.meta.get("attention_fallbacks") or []
    return "".join(f"\n  %{f['node']} (from {f['source']}): {f['reason']}" for f in fb)


@register("kv-cache", phase="cache", requires=("fuse-attention",), invalidates=("fuse-attention",))
def kv_cache(graph: Graph, page_size: int = 16, logits: str = "last") -> Graph:
    """Matches: every `attention` op (run fuse-attention first), every `selective_scan`/`causal_conv1d`,
    and the position-id range.
    Guarantees: inputs become (input_ids, positions, page_table, kv_cache_0..L-1); each attention
    reads/writes a paged cache [pages, 2, kv_heads, page_size, head_dim]; with logits=last the output
    is [batch, 1, vocab]; recurrent layers read/write `kv_cache_{i}_ssm`/`_conv` [slots, ...] through
    `kv_cache_slots [pages]`. Exact: prefill of a prompt equals the traced forward's rows."""
    if logits not in ("last", "all"):
        raise PassError(f"kv-cache: logits must be 'last' or 'all', got {logits!r}")
    if int(page_size) < 1:
        raise PassError(f"kv-cache: page_size must be positive, got {page_size}")
    page_size = int(page_size)
    left = graph.find("sdpa")
    if left:
        raise PassError(
            f"kv-cache: attention %{left[0].name} (from {left[0].source}) was not recognized as causal "
            "attention; run fuse-attention first, or the model's mask depends on input values"
            + describe_fallbacks(graph)
        )
    recurrent = any(n.op in RECURRENT for n in graph.nodes)
    if not graph.find("attention") and not graph.find("mla_attention") and not recurrent:
        if graph.meta.get("attention_fallbacks"):
            raise PassError(
                "kv-cache: no layer's attention was recognized, so there is nothing to cache; fuse-attention "
                f"left these as plain ops:{describe_fallbacks(graph)}\nkiln serves attention it recognizes "
                "(scaled_dot_product_attention with a causal or sliding-window mask); load the model with "
                "attn_implementation='sdpa' where its family allows"
            )
        raise PassError("kv-cache: the graph has no attention op; run fuse-attention before kv-cache")
    g = graph.copy()
    positions = g.add_input("positions", TensorType((BATCH, TOKENS), "int32"))
    page_table = g.add_input("page_table", TensorType((BATCH, MAX_PAGES), "int32"))
    _replace_positions(g, positions)
    layers = []
    for i, att in enumerate([n for n in g.nodes if n.op in ("attention", "mla_attention")]):
        if att.op == "mla_attention":  # a latent cache (convert-mla)
            layers.append(cache_mla(g, att, i, page_size, page_table, positions, PAGES, f"kv_cache_{i}"))
            count("cached-mla-attention")
            continue
        q, k, v = att.inputs
        kv_heads, head_dim = k.type.shape[1], k.type.shape[3]
        kv_dtype = att.attrs["kv_dtype"]
        slots = (PAGES, sympy.Integer(2), kv_heads, sympy.Integer(page_size))
        cache = g.add_input(
            f"kv_cache_{i}", TensorType(slots + (head_dim,), "int8" if kv_dtype == "int8" else k.type.dtype)
        )
        extra = [g.add_input(f"kv_cache_{i}_scale", TensorType(slots, "float32"))] if kv_dtype == "int8" else []
        alibi = att.attrs["alibi"]
        ca = g.add(
            "cached_attention",
            [q, k, v, cache, page_table, positions] + extra,
            {
                "scale": att.attrs["scale"],
                "window": att.attrs["window"],
                "layer": i,
                "kv_dtype": kv_dtype or None,
                "alibi": list(alibi) if alibi is not None else None,
                "softcap": att.attrs["softcap"],
            },
            name=f"cached_attention_{i}",
            before=att,
            source=att.source,
        )
        g.replace_all_uses(att, ca)
        g.nodes.remove(att)
        layers.append(
            {
                "kv_heads": int(kv_heads),
                "head_dim": int(head_dim),
                "num_heads": int(q.type.shape[1]),
                "window": att.attrs["window"],
            }
        )
        count("cached-attention")
    state = derive_states(g, page_table, positions, PAGES)
    if logits == "last":
        outs = []
        for out in g.outputs:
            o, tail = _head_and_tail(out)
            if o is None:
                raise PassError(f"kv-cache: logits=last needs the output to be a linear layer, got {out.op}")
            x = o.inputs[0]
            last = g.add(
                "slice",
                [x],
                {"dim": 1, "start": TOKENS - 1, "end": TOKENS, "step": 1, "last_token": True},
                name="last_token",
                before=o,
            )
            y = g.add("linear", [last] + o.inputs[1:], name=o.name + "_last", before=o, source=o.source)
            for t in tail:  # logit scaling or softcapping, re-applied to the last token's logits
                ins = [y if i is o or i in tail else i for i in t.inputs]
                o, y = t, g.add(t.op, ins, dict(t.attrs), name=t.name + "_last", before=out, source=t.source)
            outs.append(y)
            count("last-token-logits")
        g.outputs = outs
    g.dce()
    g.toposort()
    g.reinfer()
    kv_dtypes = {a.attrs["kv_dtype"] or "float32" for a in g.find("cached_attention")}
    kv_dtypes |= {"float32"} if g.find("cached_mla_attention") else set()
    # the cache tensors in input order, `pages` left symbolic: what a runtime allocates
    tensors = [
        {"name": n.name, "shape": [str(d) for d in n.type.shape], "dtype": n.type.dtype}
        for n in g.inputs
        if n.name.startswith("kv_cache_")
    ]
    g.meta["kv_cache"] = {
        "page_size": page_size,
        "dtype": kv_dtypes.pop() if len(kv_dtypes) == 1 else "mixed" if kv_dtypes else "float32",
        "layers": layers,
        "tensors": tensors,
        "layout": "[pages, 2, kv_heads, page_size, head_dim]",
    }
    if state is not None:  # state-space layers: a fixed-size state per sequence (state_cache.py)
        g.meta["kv_cache"]["state"] = state
    g.meta["logits"] = logits
    # prefill: one sequence, any length; decode: one token per sequence; verify: any batch and length
    # with logits for every token (the `last_token` slice is skipped there), for speculative decoding.
    g.meta["entry_points"] = default_entry_points()
    return g
