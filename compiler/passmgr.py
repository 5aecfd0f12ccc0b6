"""Pass manager: runs a checked pipeline (see kiln.pipeline) with verification, rewrite counters,
per-pass records and IR dumps."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import sympy

from .errors import KilnError, PassError
from .ir import Graph, sym
from .log import get, step
from .ops import flops_of
from .pipeline import check_pipeline, parse_pipeline
from .verify import verify

log = get("passes")

if TYPE_CHECKING:
    import torch

# graph.meta key: the passes a graph has been through, in order; a later pipeline is checked against it
HISTORY = "pass_history"


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
        self._ref: list[torch.Tensor] | None = None  # log-probabilities before the first lossy pass
        self._ppl0: float | None = None  # perplexity before the first lossy pass

    def run(self, graph: Graph, pipeline: str) -> Graph:
        """Check the whole pipeline against the graph's pass history, then run it pass by pass."""
        from kiln.passes import REGISTRY, run_counted

        steps = parse_pipeline(pipeline)
        history = list(graph.meta.get(HISTORY, []))
        check_pipeline(steps, history)
        if self.dump_ir:
            os.makedirs(self.dump_ir, exist_ok=True)
            self._dump(0, "trace", graph)
        done: list[str] = []
        for i, (name, params) in enumerate(steps, 1):
            info = REGISTRY[name]
            step(log, f"pass {name}", i, len(steps))
            before = graph.stats()
            f0 = flops_per_token(graph)
            t0 = time.perf_counter()
            try:
                out, counts = run_counted(info, graph, params)
                if self.verify_each:
                    verify(out)
            except PassError:
                raise
            except Exception as e:  # parameters were checked above: this is the pass failing, a bug included
                after = f" (after {', '.join(done)})" if done else ""
                why = str(e) if isinstance(e, KilnError) else f"{type(e).__name__}: {e}"
                raise PassError(f"pass '{name}'{after} failed: {why}") from e
            dt = time.perf_counter() - t0
            after_stats = out.stats()
            extra = self._evaluate(graph, out) if not info.exact else {}
            extra.update(out.meta.pop("pass_extra", {}))  # what the pass itself reports (pruning shapes ...)
            self.records.append(
                PassRecord(
                    name,
                    params,
                    info.exact,
                    counts,
                    before["nodes"],
                    after_stats["nodes"],
                    before["param_bytes"],
                    after_stats["param_bytes"],
                    f0,
                    flops_per_token(out),
                    round(dt, 4),
                    extra,
                )
            )
            r = self.records[-1]
            log.debug(
                "pass %s: %s; nodes %d -> %d, param bytes %d -> %d, %.2fs",
                name,
                ", ".join(f"{k} {v}" for k, v in counts.items()) or "no rewrites",
                r.nodes_before,
                r.nodes_after,
                r.param_bytes_before,
                r.param_bytes_after,
                dt,
            )
            done.append(name)
            history.append(name)
            out.meta[HISTORY] = list(history)
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
        assert self._ppl0 is not None and kl is not None  # _ppl0 is set with _ref; a reference gives a KL
        return {
            "eval_tokens": sum(len(w) for w in tokens),
            "perplexity_before": round(self._ppl0, 4),
            "perplexity_after": round(ppl, 4),
            "kl_to_reference": round(kl, 6),
        }

    def _dump(self, i: int, name: str, g: Graph) -> None:
        assert self.dump_ir is not None  # called only when dumping
        with open(os.path.join(self.dump_ir, f"{i:02d}-{name}.txt"), "w") as f:
            f.write(str(g) + "\n")


def run_pipeline(
    graph: Graph, pipeline: str, verify_each: bool = True, dump_ir: str | None = None
) -> tuple[Graph, list[PassRecord]]:
    pm = PassManager(verify_each, dump_ir)
    g = pm.run(graph, pipeline)
    return g, pm.records
