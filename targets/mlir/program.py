"""The program the `mlir` target exports: optimized kiln IR rebuilt as a functional PyTorch module.

`to_torch_module(graph)` gives an `nn.Module` whose `prefill` / `decode` run the IR op by op with the
torch reference implementations of `kiln.ops`, parameters registered as buffers. MLIR tensors are
values, so each entry point returns the updated KV caches instead of writing them in place; the ops
with no clean MLIR form (`qweight`, paged `cached_attention`) are rewritten to standard torch ops here.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from kiln.dims import DimError, eval_dim
from kiln.errors import KilnError, UnsupportedOpError
from kiln.interp import execute, reference_step
from kiln.ir import Graph, Node
from kiln.ops import OPS, _rebuild, find_rule, kv_fake_quant, norm_dim, register_rule, torch_dtype

ENTRY_POINTS: tuple[str, ...] = ("prefill", "decode")

# -- symbolic dimensions at export time ---------------------------------------------------------


def _dim_value(e: Any, env: dict[str, Any]) -> Any:
    """Evaluate a sympy dim with symbols bound to ints or torch SymInts (no specialization)."""
    try:
        return eval_dim(e, env)
    except DimError as err:
        raise KilnError(f"mlir target: {err}") from None


class _Ctx:
    """Sizes bound to ints or SymInts, and the state the "mlir" rules share: the caches as they are
    updated (functionally), and whether the logits of every token are wanted."""

    def __init__(self, env: dict[str, Any]) -> None:
        self.env = env
        self.node: Node | None = None
        self.caches: dict[str, torch.Tensor] = {}
        self.full_logits = False

    def eval(self, expr: Any) -> Any:
        return _dim_value(expr, self.env)


# -- lowerings of ops with no clean MLIR form ---------------------------------------------------


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """(codes.float() - zeros) * scales, one scale/zero per `group` input columns (ragged last group)."""
    n, k = codes.shape
    g = group or k
    if g >= k:
        return (codes.float() - zeros[:, :1]) * scales[:, :1]
    # expand per-group scales/zeros over their columns (static sizes: no padding needed)
    idx = torch.arange(k) // g
    return (codes.float() - zeros[:, idx]) * scales[:, idx]


def paged_append(
    cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, page_table: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Functional paged KV append: a new cache with k/v written at `positions`.

    cache [pages, 2, Hkv, page, D]; k, v [B, Hkv, T, D]; page_table [B, max_pages]; positions [B, T]
    (< 0 marks padding: those rows go to a scratch page appended for the write and dropped after)."""
    pages, page = cache.shape[0], cache.shape[3]
    pos = positions.long()
    valid = pos >= 0
    p = pos.clamp_min(0)
    pg = torch.gather(page_table.long(), 1, p // page)  # [B, T]
    pg = torch.where(valid, pg, torch.full_like(pg, pages))
    slot = p % page
    hkv, dh = cache.shape[2], cache.shape[4]
    scratch = torch.zeros_like(cache[:1])
    # rows = (page, slot) pairs: [pages + 1, 2, Hkv, page, D] -> [(pages + 1) * page, 2 * Hkv * D]
    flat = torch.cat([cache, scratch], 0).permute(0, 3, 1, 2, 4).reshape(-1, 2 * hkv * dh)
    rows = (pg * page + slot).reshape(-1)  # [B * T]
    kv = torch.stack([k, v], 1).permute(0, 3, 1, 2, 4).reshape(-1, 2 * hkv * dh)  # [B * T, 2 * Hkv * D]
    flat = flat.index_put((rows,), kv)
    full = flat.reshape(-1, page, 2, hkv, dh).permute(0, 2, 3, 1, 4)
    return full[:pages]


def paged_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    page_table: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """Attend q [B, H, T, D] over the pages of each sequence (gathered through page_table) up to its
    own position; causal and optional sliding window; GQA by repeating KV heads; padding rows -> 0."""
    B, H, T, D = q.shape
    page = cache.shape[3]
    hkv = cache.shape[2]
    mp = page_table.shape[1]
    g = cache[page_table.long()]  # [B, max_pages, 2, Hkv, page, D]
    g = g.permute(0, 2, 3, 1, 4, 5).reshape(B, 2, hkv, mp * page, cache.shape[4])
    keys, vals = g[:, 0], g[:, 1]
    rep = H // hkv
    if rep > 1:  # repeat_interleave(rep, dim=1), written as expand + reshape for symbolic sizes
        s_len = keys.shape[2]
        keys = keys[:, :, None].expand(B, hkv, rep, s_len, keys.shape[3]).reshape(B, H, s_len, keys.shape[3])
        vals = vals[:, :, None].expand(B, hkv, rep, s_len, vals.shape[3]).reshape(B, H, s_len, vals.shape[3])
    s = torch.matmul(q, keys.transpose(-1, -2)) * scale  # [B, H, T, S]
    pos = positions.long()
    j = torch.arange(mp * page)[None, None, :]
    i = pos[:, :, None]
    m = j <= i
    if window:
        m = m & (j > i - window)
    s = s.masked_fill(~m[:, None], float("-inf"))
    o = torch.matmul(torch.softmax(s, -1), vals)
    return torch.where((pos >= 0)[:, None, :, None], o, torch.zeros_like(o))


# -- the reconstructed program -------------------------------------------------------------------


def _buffer_name(param: str) -> str:
    return "p_" + re.sub(r"[^0-9A-Za-z_]", "_", param)


class KilnProgram(torch.nn.Module):
    """An optimized kiln graph as a functional PyTorch program.

    `prefill(input_ids [1, T], positions [1, T], page_table [1, P], *kv_caches)` and
    `decode(input_ids [B, 1], positions [B, 1], page_table [B, P], *kv_caches)` both return
    `(logits, *new_kv_caches)`. Parameters are registered buffers named after the kiln parameters
    (`param_names` maps buffer name -> kiln name)."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        for n in graph.nodes:
            if n.op not in OPS and n.op not in ("input", "param"):
                raise UnsupportedOpError(n.op, n.source, "the mlir target knows no such op")
        if "kv_cache" not in graph.meta:
            raise KilnError(
                "the mlir target needs the kv-cache pass (prefill/decode entry points): "
                "run O0/O1 or add kv-cache to the pipeline"
            )
        self.graph = graph
        self.param_names: dict[str, str] = {}
        for name, t in graph.params.items():
            b = _buffer_name(name)
            self.param_names[b] = name
            self.register_buffer(b, t.detach(), persistent=True)
        self.input_names = [n.name for n in graph.inputs]
        self.cache_names = [n for n in self.input_names if n.startswith("kv_cache_")]
        self.entry_points: dict[str, dict[str, int]] = {
            k: v.dims for k, v in graph.meta["entry_points"].items() if k in ENTRY_POINTS
        }

    # the core: one op after another, with weights from `params` (kiln name -> tensor)
    def run(
        self, inputs: dict[str, torch.Tensor], params: dict[str, torch.Tensor] | None = None, full_logits: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Run the graph on named inputs; returns (outputs..., new caches...) in graph order."""
        g = self.graph
        if params is None:
            params = {k: getattr(self, b) for b, k in self.param_names.items()}
        env: dict[str, Any] = {}
        for node in g.inputs:
            t = inputs[node.name]
            for d, size in zip(node.type.shape, t.shape):
                if d.is_Symbol and d.name not in env:
                    env[d.name] = size
        caches = {name: inputs[name] for name in self.cache_names}
        vals = execute(
            g, inputs, params, _Ctx(env), step=lambda ctx, node, x: self._op(ctx, node, x, caches, full_logits)
        )
        outs = [vals[o] for o in g.outputs]
        return tuple(outs) + tuple(caches[n] for n in self.cache_names)

    def _op(
        self, ctx: _Ctx, node: Node, x: list[torch.Tensor], caches: dict[str, torch.Tensor], full_logits: bool
    ) -> torch.Tensor:
        """One node's value: its "mlir" rule (below) where it has one, else its reference semantics."""
        ctx.caches, ctx.full_logits = caches, full_logits
        rule = find_rule(node.op, ("mlir",))
        return rule(ctx, node, x) if rule is not None else reference_step(ctx, node, x)

    def _call(self, entry: str, input_ids, positions, page_table, kv_caches) -> tuple[torch.Tensor, ...]:
        if len(kv_caches) != len(self.cache_names):
            raise KilnError(f"{entry} takes {len(self.cache_names)} KV caches, got {len(kv_caches)}")
        ins = {
            "input_ids": input_ids,
            "positions": positions,
            "page_table": page_table,
            **dict(zip(self.cache_names, kv_caches)),
        }
        return self.run(ins)

    def prefill(
        self, input_ids: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor, *kv_caches: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """One sequence [1, T] -> (logits [1, 1, vocab], *new_kv_caches)."""
        return self._call("prefill", input_ids, positions, page_table, kv_caches)

    def decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor, *kv_caches: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """One token per sequence [B, 1] -> (logits [B, 1, vocab], *new_kv_caches)."""
        return self._call("decode", input_ids, positions, page_table, kv_caches)

    forward = prefill

    def empty_caches(self, pages: int) -> list[torch.Tensor]:
        """Zero KV caches with `pages` pages, in argument order."""
        out = []
        for n in self.graph.inputs:
            if n.name in self.cache_names:
                shape = [pages if (d.is_Symbol and d.name == "pages") else int(d) for d in n.type.shape]
                out.append(torch.zeros(shape, dtype=torch_dtype(n.type.dtype)))
        return out

    def weight_order(self) -> list[str]:
        """kiln parameter names in the order the exported functions take them."""
        return sorted(self.graph.params)


def to_torch_module(graph: Graph) -> KilnProgram:
    """The reconstructed PyTorch program of an optimized graph (after kv-cache): see `KilnProgram`."""
    return KilnProgram(graph).eval()


class _Entry(torch.nn.Module):
    """One entry point with the weights as explicit (trailing) arguments, for torch.export."""

    def __init__(self, program: KilnProgram, entry: str) -> None:
        super().__init__()
        object.__setattr__(self, "_program", program)  # not a submodule: its buffers must not be lifted
        self.entry = entry
        self.names = program.weight_order()

    def forward(self, input_ids, positions, page_table, kv_caches, weights):
        p = self._program
        ins = {
            "input_ids": input_ids,
            "positions": positions,
            "page_table": page_table,
            **dict(zip(p.cache_names, kv_caches)),
        }
        return p.run(ins, dict(zip(self.names, weights)))


# -- "mlir" rules: the ops whose reference semantics torch.export / torch-mlir cannot take as they are ------


@register_rule("mlir", "cached_attention")
def _cached_attention(ctx: _Ctx, node: Node, x: list[torch.Tensor]) -> torch.Tensor:
    """A functional paged append (the updated cache replaces the old one in ctx.caches), then attention."""
    a = node.attrs
    if node.input("scales") is not None:
        raise UnsupportedOpError(
            "cached_attention with an int8 KV cache",
            node.source,
            "the mlir target keeps an fp32 cache (quantize-kv dtype=fp8_e4m3 is "
            "fake-quantized into it; int8 codes with scales are not)",
        )
    if a["softcap"]:
        raise UnsupportedOpError(
            "cached_attention with softcapped scores", node.source, "the mlir target has no softcap; use --target cpu"
        )
    q, k, v, cache, pt, pos = x
    k, v = kv_fake_quant(k, a["kv_dtype"]), kv_fake_quant(v, a["kv_dtype"])
    cache_node = node.input("cache")
    assert cache_node is not None  # a required input of cached_attention
    cache_name = cache_node.name
    new = paged_append(ctx.caches[cache_name], k, v, pt, pos)
    ctx.caches[cache_name] = new
    return paged_attention(q, new, pt, pos, a["scale"], a["window"])


@register_rule("mlir", "qweight")
def _qweight(ctx: _Ctx, node: Node, x: list[torch.Tensor]) -> torch.Tensor:
    return dequantize(x[0], x[1], x[2], node.attrs["group"])


@register_rule("mlir", "slice")
def _slice(ctx: _Ctx, node: Node, x: list[torch.Tensor]) -> torch.Tensor:
    """Bounds as SymInt arithmetic (no specialization); the last-token slice keeps every token when asked."""
    a, t = node.attrs, x[0]
    if ctx.full_logits and a.get("last_token"):
        return t
    d = norm_dim(a["dim"], t.dim())
    size = t.shape[d]
    start, end, step = ctx.eval(a["start"]), ctx.eval(a["end"]), a["step"]
    if isinstance(start, int) and start < 0:
        start = size + start
    if isinstance(end, int):
        end = size + end if end < 0 else (size if end >= 2**62 else end)
    out = t.narrow(d, start, end - start)
    return out if step == 1 else out[(slice(None),) * d + (slice(None, None, step),)]


@register_rule("mlir", "const")
def _const(ctx: _Ctx, node: Node, x: list[torch.Tensor]) -> torch.Tensor:
    return torch.full((), node.attrs["value"], dtype=torch_dtype(node.type.dtype))


@register_rule("mlir", "aten")
def _aten(ctx: _Ctx, node: Node, x: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return a["fn"](*_rebuild(a["args"], x, ctx), **_rebuild(a["kwargs"], x, ctx))
