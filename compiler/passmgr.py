"""Pass manager: pipelines as strings, verification, rewrite counters, per-pass records, IR dumps."""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import sympy

from .errors import PassError
from .ir import Graph, sym
from .ops import flops_of
from .verify import verify

# Pipelines are data; a name expands to its pass list.
PIPELINES: dict[str, str] = {
    # The minimum that runs: attention recognized so the KV cache can be derived.
    "O0": "canonicalize,fuse-attention,kv-cache,canonicalize",
    # Recognize the LLM-level ops that the targets have fused kernels for.
    "O1": "canonicalize,fuse-norms,fuse-rope,fuse-attention,fuse-mlp,kv-cache,canonicalize",
}


@dataclass
class PassRecord:
    name: str
    params: dict[str, Any]
    exact: bool
    rewrites: dict[str, int]
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int
    flops_per_token_before: int
    flops_per_token_after: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def format_pipeline(steps: list[tuple[str, dict[str, Any]]]) -> str:
    return ",".join(n + ("{" + ",".join(f"{k}={v}" for k, v in p.items()) + "}" if p else "") for n, p in steps)


def with_attention(pipeline: str, spec: str) -> str:
    """Insert an attention conversion right after fuse-attention: "gqa:N" / "mqa" -> convert-gqa{kv_heads=N},
    "mla:R" or "mla:R:ROPE_DIMS" -> convert-mla{rank=R,rope_dims=ROPE_DIMS}."""
    parts = spec.lower().split(":")
    try:
        if parts[0] in ("gqa", "mqa") and len(parts) <= 2:
            step = ("convert-gqa", {"kv_heads": int(parts[1]) if len(parts) == 2 else 1})
        elif parts[0] == "mla" and len(parts) in (2, 3):
            step = ("convert-mla", {"rank": int(parts[1]), **({"rope_dims": int(parts[2])} if len(parts) == 3 else {})})
        else:
            raise ValueError
    except ValueError:
        raise PassError(f"attention={spec!r} is not a conversion; use gqa:N, mqa, mla:RANK or mla:RANK:ROPE_DIMS") from None
    steps = parse_pipeline(pipeline)
    names = [n for n, _ in steps]
    if "fuse-attention" not in names:
        raise PassError(f"attention={spec!r} needs fuse-attention in the pipeline '{pipeline}'")
    at = names.index("fuse-attention") + 1
    return format_pipeline(steps[:at] + [step] + steps[at:])


def with_quantization(pipeline: str, quant: str | None = None, method: str = "rtn", kv: str | None = None,
                      activations: bool = False, lm_head: str = "same") -> str:
    """Insert quantization passes into a pipeline: weight/activation passes before fuse-mlp (they
    observe each linear's input), KV before kv-cache."""
    steps = parse_pipeline(pipeline)
    names = [n for n, _ in steps]
    at = names.index("fuse-mlp") if "fuse-mlp" in names else names.index("kv-cache") if "kv-cache" in names else len(steps)
    add = []
    if activations:
        add.append(("quantize-activations", {}))
    elif quant:
        add.append(("quantize-weights", {"scheme": quant, "method": method, **({"lm_head": lm_head}
                                                                               if lm_head != "same" else {})}))
    if kv:
        add.append(("quantize-kv", {"dtype": kv}))
    return format_pipeline(steps[:at] + add + steps[at:])


def with_pruning(pipeline: str, prune: str | None = None, sparsify: str | None = None,
                 sparsify_method: str = "wanda") -> str:
    """Insert pruning/sparsity passes before fuse-mlp (they read each MLP's structure and each linear's
    input). `prune`: pass names ("prune-heads{ratio=0.2},prune-ffn{ratio=0.2}") or the short form
    "heads=0.2,ffn=0.2,layers=2"; `sparsify`: a ratio ("0.5") or an N:M pattern ("2:4")."""
    add: list[tuple[str, dict[str, Any]]] = []
    if prune:
        if "prune-" in prune:
            add += parse_pipeline(prune)
        else:
            short = {"layers": ("prune-layers", "n"), "heads": ("prune-heads", "ratio"), "ffn": ("prune-ffn", "ratio")}
            for item in prune.split(","):
                k, _, v = item.partition("=")
                if k.strip() not in short or not v:
                    raise PassError(f"prune={prune!r}: expected items like heads=0.2, ffn=0.2, layers=2, or pass names "
                                    "like prune-heads{ratio=0.2}")
                name, key = short[k.strip()]
                add.append((name, {key: _value(v.strip())}))
            add.sort(key=lambda s: s[0] != "prune-layers")  # layers first: rank blocks of the unpruned model
    if sparsify:
        s = str(sparsify)
        add.append(("sparsify", {"pattern": s, "method": sparsify_method} if ":" in s else
                    {"ratio": _value(s), "method": sparsify_method}))
    steps = parse_pipeline(pipeline)
    names = [n for n, _ in steps]
    at = names.index("fuse-mlp") if "fuse-mlp" in names else names.index("kv-cache") if "kv-cache" in names else len(steps)
    return format_pipeline(steps[:at] + add + steps[at:])


def parse_pipeline(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """'canonicalize,kv-cache{page_size=16},O1' -> [(name, params), ...] with pipelines expanded."""
    out: list[tuple[str, dict[str, Any]]] = []
    for m in re.finditer(r"\s*([A-Za-z0-9_\-]+)\s*(\{[^}]*\})?\s*(,|$)", spec.strip()):
        name, params = m.group(1), m.group(2)
        if name in PIPELINES:
            if params:
                raise PassError(f"pipeline '{name}' takes no parameters")
            out.extend(parse_pipeline(PIPELINES[name]))
            continue
        kv: dict[str, Any] = {}
        if params:
            for item in params[1:-1].split(","):
                if not item.strip():
                    continue
                if "=" not in item:
                    raise PassError(f"pass parameter '{item}' of '{name}' must be key=value")
                k, v = item.split("=", 1)
                kv[k.strip()] = _value(v.strip())
        out.append((name, kv))
    if not out:
        raise PassError(f"empty pipeline {spec!r}")
    return out


def _value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def flops_per_token(g: Graph) -> int:
    env = {sym("batch"): 1, sym("tokens"): 1}
    total = sympy.Integer(0)
    for n in g.nodes:
        total += flops_of(n)
    v = total.subs(env)
    return int(v) if v.is_number else 0


class PassManager:
    """Runs a pipeline; verifies after each pass (when asked), records effects, dumps IR."""

    def __init__(self, verify_each: bool = True, dump_ir: str | None = None) -> None:
        self.verify_each = verify_each
        self.dump_ir = dump_ir
        self.records: list[PassRecord] = []
        self._ref = None
        self._ppl0 = None

    def run(self, graph: Graph, pipeline: str) -> Graph:
        from kiln.passes import REGISTRY, run_counted
        steps = parse_pipeline(pipeline)
        for name, _ in steps:
            if name not in REGISTRY:
                raise PassError(f"unknown pass '{name}'; known passes: {', '.join(sorted(REGISTRY))}; "
                                f"pipelines: {', '.join(PIPELINES)}")
        if self.dump_ir:
            os.makedirs(self.dump_ir, exist_ok=True)
            self._dump(0, "trace", graph)
        done: list[str] = []
        for i, (name, params) in enumerate(steps, 1):
            info = REGISTRY[name]
            before = graph.stats()
            f0 = flops_per_token(graph)
            t0 = time.perf_counter()
            try:
                out, counts = run_counted(info, graph, params)
                if self.verify_each:
                    verify(out)
            except TypeError as e:
                raise PassError(f"pass '{name}' rejected parameters {params}: {e}") from e
            except Exception as e:
                if isinstance(e, PassError):
                    raise
                after = f" (after {', '.join(done)})" if done else ""
                raise PassError(f"pass '{name}'{after} failed: {e}") from e
            dt = time.perf_counter() - t0
            after_stats = out.stats()
            extra = self._evaluate(graph, out) if not info.exact else {}
            extra.update(out.meta.pop("pass_extra", {}))  # what the pass itself reports (pruning shapes ...)
            self.records.append(PassRecord(name, params, info.exact, counts, before["nodes"], after_stats["nodes"],
                                           before["param_bytes"], after_stats["param_bytes"], f0,
                                           flops_per_token(out), round(dt, 4), extra))
            done.append(name)
            graph = out
            if self.dump_ir:
                self._dump(i, name, graph)
        return graph

    def _evaluate(self, before: Graph, after: Graph) -> dict[str, Any]:
        """For a lossy pass, when evaluation text is attached: perplexity before/after and mean KL of
        the result to the graph as it was before the first lossy pass."""
        tokens = after.meta.get("eval_tokens")
        if not tokens or after.find("cached_attention"):
            return {}
        from .calib import perplexity_and_kl
        if self._ref is None:
            self._ppl0, _, self._ref = perplexity_and_kl(before, tokens)
        ppl, kl, _ = perplexity_and_kl(after, tokens, self._ref)
        return {"eval_tokens": sum(len(w) for w in tokens), "perplexity_before": round(self._ppl0, 4),
                "perplexity_after": round(ppl, 4), "kl_to_reference": round(kl, 6)}

    def _dump(self, i: int, name: str, g: Graph) -> None:
        with open(os.path.join(self.dump_ir, f"{i:02d}-{name}.txt"), "w") as f:
            f.write(str(g) + "\n")


def run_pipeline(graph: Graph, pipeline: str, verify_each: bool = True,
                 dump_ir: str | None = None) -> tuple[Graph, list[PassRecord]]:
    pm = PassManager(verify_each, dump_ir)
    g = pm.run(graph, pipeline)
    return g, pm.records
