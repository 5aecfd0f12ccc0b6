"""Per-projection sensitivity to weight quantization: how far the model's predictions move (KL to the
unquantized model, nats per token) when only one projection is quantized under one scheme.

Measuring that directly costs a forward pass per (projection, scheme): hundreds for a 30-layer model.
Instead one forward and backward pass per calibration window gives everything at once, by the
second-order expansion of the KL around the unquantized model: a perturbation e of a linear's output y
moves the predictions by KL ~ 1/2 e^T F e, where F is the Fisher information of the outputs, estimated
from the gradient g of log p(y_hat) with y_hat sampled from the model's own predictions (E[g g^T] = F).
Keeping F's diagonal, a projection's KL is 1/2 sum over tokens and channels of g^2 e^2, with e = x dW^T
its output error on the calibration inputs x (dW the rounding error of the scheme). A tied embedding
(the output layer's weights read as the input table) adds its own rows' error at the embedding's
output. Tests compare the estimate with the measured KL on a tiny model.

Units are what a plan can set independently: one projection, or the gate and up projections of a
gated MLP together (one kernel streams both, so they share a scheme).

Results are cached on disk (`kiln.models.cache_dir()/tune/`), keyed by the weights' content, the
calibration tokens and the schemes; a second call with the same inputs reads them back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch

from . import interp
from .errors import KilnError
from .ir import Graph, Node
from .log import get, step
from .quant import WeightQuant, dequantize, parse_scheme, rtn

log = get("tune")

VERSION = 1  # bump when the estimate changes: cached results of another version are not reused
COUNTERS = {"computed": 0, "cache_hits": 0}  # how many analyses ran and how many were read back (tests)


@dataclass
class Unit:
    """Weights a plan sets together: `weights` (parameter names), read by `linears`; `embeddings` are
    embedding nodes whose table is one of them (tied to the output layer)."""

    key: str
    weights: tuple[str, ...]
    linears: list[Node] = field(default_factory=list)
    embeddings: list[Node] = field(default_factory=list)
    shapes: tuple[tuple[int, int], ...] = ()


def find_units(g: Graph) -> list[Unit]:
    """The plan's units in graph order: every linear over a parameter weight, gate and up of a gated MLP
    (`down(act(gate(x)) * up(x))`) as one unit, the output layer with an embedding that shares its
    weights. Runs on the full-sequence program before fuse-mlp (linears still separate)."""
    if g.find("gated_mlp"):
        raise KilnError("sensitivity analysis reads each linear: run it before fuse-mlp")
    linears = [n for n in g.nodes if n.op == "linear" and n.inputs[1].op == "param"]
    users: dict[Node, list[Node]] = {}
    for n in g.nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n)
    partner: dict[Node, Node] = {}
    for n in linears:  # n = gate: act(n) * u with u a linear over the same input
        for a in users.get(n, []):
            if a.op not in ("silu", "gelu"):
                continue
            for m in users.get(a, []):
                if m.op != "mul":
                    continue
                u = next((x for x in m.inputs if x is not a), None)
                if u is not None and u in linears and u.inputs[0] is n.inputs[0] and u is not n:
                    partner[n], partner[u] = u, n
    units: list[Unit] = []
    seen: set[str] = set()
    for n in linears:
        name = n.inputs[1].attrs["name"]
        if name in seen:
            continue
        members = [n] + ([partner[n]] if n in partner else [])
        names = tuple(dict.fromkeys(m.inputs[1].attrs["name"] for m in members))
        seen.update(names)
        shapes = tuple(tuple(int(d) for d in g.params[w].shape) for w in names)
        units.append(Unit(names[0], names, members, [], shapes))  # type: ignore[arg-type]
    by_weight = {w: u for u in units for w in u.weights}
    for n in g.find("embedding"):
        p = n.inputs[0]
        if p.op == "param" and p.attrs["name"] in by_weight:
            by_weight[p.attrs["name"]].embeddings.append(n)
    for n in linears:  # a weight read by several linears (rare): all of them carry its error
        owner = by_weight[n.inputs[1].attrs["name"]]
        if n not in owner.linears:
            owner.linears.append(n)
    return units


def stored_bytes(shape: tuple[int, int], scheme: WeightQuant | None) -> int:
    """Bytes of a weight [N, K] as the CPU and GPU kernels store it: fp32, or codes (int8 one byte, 3- and
    4-bit codes two per byte) with an fp32 scale (and an fp32 zero point when asymmetric) per group."""
    n, k = shape
    if scheme is None:
        return 4 * n * k
    group = scheme.group_for(k)
    groups = -(-k // group)
    kp = groups * group  # a ragged last group is padded
    codes = n * kp if scheme.bits == 8 else -(-n * kp // 2)
    return codes + n * groups * 4 * (1 if scheme.sym else 2)


def unit_bytes(u: Unit, scheme: WeightQuant | None) -> int:
    return sum(stored_bytes(s, scheme) for s in u.shapes)


def _content_key(g: Graph, units: list[Unit], tokens: list[list[int]], schemes: list[str]) -> str:
    h = hashlib.sha256(f"kiln-sensitivity-v{VERSION}".encode())
    for u in units:
        for w in u.weights:
            t = g.params[w].detach().float().contiguous()
            h.update(w.encode() + str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    h.update(json.dumps([tokens, sorted(schemes), [u.key for u in units]]).encode())
    return h.hexdigest()[:24]


def sensitivity(
    g: Graph, tokens: list[list[int]], schemes: list[str], use_cache: bool = True, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Estimated KL to the unquantized model (nats per token) when only one unit is quantized:
    {unit key: {scheme: kl}} for every unit of `find_units(g)` and every scheme, from the calibration
    windows `tokens`. Cached on disk; `use_cache=False` recomputes (and refreshes the cache)."""
    from .models import cache_dir

    units = find_units(g)
    if not units:
        raise KilnError("sensitivity analysis found no linear layer over a weight parameter")
    for s in schemes:
        parse_scheme(s)  # a misspelt scheme is refused before the slow steps
    key = _content_key(g, units, tokens, schemes)
    path = os.path.join(cache_dir(), "tune", f"sensitivity-{key}.json")
    if use_cache and os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
        COUNTERS["cache_hits"] += 1
        log.info(f"sensitivity read from the cache ({path})")
        return doc["kl"]
    kl = _estimate(g, units, tokens, schemes, seed)
    COUNTERS["computed"] += 1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"version": VERSION, "schemes": schemes, "windows": len(tokens), "kl": kl}, f, indent=0)
    os.replace(tmp, path)
    return kl


def _estimate(
    g: Graph, units: list[Unit], tokens: list[list[int]], schemes: list[str], seed: int
) -> dict[str, dict[str, float]]:
    want = {n for u in units for n in u.linears} | {n for u in units for n in u.embeddings}
    xs: dict[Node, list[torch.Tensor]] = {n: [] for n in want}  # a linear's inputs [T, K]
    gs: dict[Node, list[torch.Tensor]] = {n: [] for n in want}  # gradient at its output [T, N]
    ids_seen: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(seed)
    # autograd needs a leaf upstream of every activation: the embedding tables (every token passes them)
    tables = {n.inputs[0].attrs["name"] for n in g.find("embedding") if n.inputs[0].op == "param"}
    params = {k: (v.detach().clone().requires_grad_() if k in tables else v) for k, v in g.params.items()}
    if not tables:
        params = {k: v.detach().clone().requires_grad_() for k, v in g.params.items()}
    feeds = {n.inputs[0] for n in want if n.op == "linear"}
    for wi, window in enumerate(tokens, 1):
        outs: dict[Node, torch.Tensor] = {}
        seen: dict[Node, torch.Tensor] = {}  # the linears' inputs in this window

        def observe(node: Node, value: torch.Tensor) -> None:
            if node in feeds:
                seen[node] = value.detach()
            if node in want and value.requires_grad:
                value.retain_grad()
                outs[node] = value
                if node.op == "linear":
                    xs[node].append(_flat(seen[node.inputs[0]]))

        logits = interp.run(g, {"input_ids": torch.tensor([window])}, params, observe=observe, grad=True)[0][0]
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits.double(), -1).float(), 1, generator=gen)[:, 0]
        logp = torch.log_softmax(logits, -1)
        logp.gather(1, sampled[:, None]).sum().backward()
        for n, v in outs.items():
            assert v.grad is not None, f"no gradient reached {n.name}"
            gs[n].append(_flat(v.grad).detach())
        ids_seen.append(torch.tensor(window))
        for p in params.values():
            p.grad = None
        step(log, "sensitivity: calibration window", wi, len(tokens))
    ntok = sum(len(w) for w in tokens)
    ids = torch.cat(ids_seen)
    out: dict[str, dict[str, float]] = {}
    for ui, u in enumerate(units, 1):
        row = {}
        for s in schemes:
            sch = parse_scheme(s)
            total = 0.0
            for w in u.weights:
                W = g.params[w].detach().float()
                q, sc, z = rtn(W, sch)
                dW = dequantize(q, sc, z, sch.group_for(W.shape[1])) - W  # [N, K]
                for n in u.linears:
                    if n.inputs[1].attrs["name"] != w:
                        continue
                    X, G = torch.cat(xs[n]), torch.cat(gs[n])  # [T, K], [T, N]
                    total += 0.5 * float(((X @ dW.T) * G).pow(2).sum())
                for n in u.embeddings:
                    if n.inputs[0].attrs["name"] != w:
                        continue
                    G = torch.cat(gs[n])  # [T, D]
                    total += 0.5 * float((dW[ids] * G).pow(2).sum())
            row[s] = total / ntok if math.isfinite(total) else float("inf")
        out[u.key] = row
        step(log, "sensitivity: unit", ui, len(units))
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).float()
