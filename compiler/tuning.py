"""`kiln tune`: the smallest (or fastest) artifact within an accuracy budget, one scheme per projection.

1. Sensitivity (kiln/sensitivity.py): the KL each projection alone adds under each scheme, estimated on
   the calibration text (cached).
2. A greedy path: from fp32, repeatedly take the move (one unit to a cheaper scheme) that adds the least
   estimated KL per byte saved, down to every unit at its cheapest scheme. The path orders the plans
   from largest to smallest; accuracy falls along it, by the estimate.
3. Measured checks on held-out text (never the calibration text): each candidate plan quantizes the IR
   and the reference interpreter gives its perplexity and KL to fp32. A search along the path (its first
   probe where the estimate meets the budget, then bisection) finds the furthest plan within budget; a
   local search then tries the path's later moves one by one on top of it.
4. For `objective="speed"` the few smallest plans within budget (and the one with the most int8 weights)
   are built and their decode measured; the fastest wins. For `objective="size"` the smallest wins.

Every evaluated plan is a point of the frontier (JSON and a plot, with the single-scheme builds beside).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import KilnError
from .log import get, takes_progress

log = get("tune")

BASE = "canonicalize,fuse-norms,fuse-rope,fuse-attention"  # the full-sequence program quantize-weights sees
DEFAULT_SCHEMES = ("int8", "int4_g32", "int4_g64", "int4_g128")  # what the CPU and GPU kernels run


@dataclass(frozen=True)
class Budget:
    """`ppl+1%` (perplexity at most 1% above fp32), `ppl+0.5` (at most 0.5 above), `kl:0.01` (mean KL to
    fp32 at most 0.01 nats per token), all on the held-out text."""

    kind: str  # "ppl" or "kl"
    value: float
    relative: bool = False

    def ok(self, ppl: float, kl: float, ppl0: float) -> bool:
        if self.kind == "kl":
            return kl <= self.value
        limit = ppl0 * (1 + self.value / 100) if self.relative else ppl0 + self.value
        return ppl <= limit

    def as_kl(self, ppl0: float) -> float:
        """The budget as nats per token (a perplexity ratio r is log r nats): where the search starts."""
        if self.kind == "kl":
            return self.value
        return math.log1p(self.value / 100) if self.relative else math.log1p(self.value / ppl0)

    def __str__(self) -> str:
        return f"kl:{self.value:g}" if self.kind == "kl" else f"ppl+{self.value:g}{'%' if self.relative else ''}"


def parse_budget(text: str) -> Budget:
    """'ppl+1%', 'ppl+0.5' or 'kl:0.01' -> Budget; anything else is refused with the forms it takes."""
    t = text.strip().lower().replace(" ", "")
    m = re.fullmatch(r"ppl\+(\d+(?:\.\d*)?|\.\d+)(%?)", t)
    if m and float(m.group(1)) >= 0:
        return Budget("ppl", float(m.group(1)), relative=m.group(2) == "%")
    m = re.fullmatch(r"kl[:<=]+(\d+(?:\.\d*)?(?:e-?\d+)?|\.\d+)", t)
    if m:
        return Budget("kl", float(m.group(1)))
    raise KilnError(
        f"budget {text!r} is not one kiln tune reads: use ppl+1% (perplexity at most 1% above fp32), "
        "ppl+0.5 (at most 0.5 above) or kl:0.01 (mean KL to fp32, nats per token), on the held-out text"
    )


@dataclass
class Candidate:
    """One evaluated plan: its bytes (weights the plan sets plus everything else), held-out perplexity
    and KL to fp32, the estimate it was chosen by, and decode speed when measured."""

    name: str
    plan: dict[str, str]
    weight_bytes: int
    est_kl: float | None
    ppl: float | None = None
    kl: float | None = None
    within_budget: bool | None = None
    decode_tok_s: float | None = None
    kind: str = "search"  # search | local | reference

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("plan")
        d["schemes"] = _counts(self.plan)
        return d


@dataclass
class TuneResult:
    """The chosen plan, every candidate evaluated, and where the artifact and report went."""

    budget: str
    objective: str
    ppl_fp32: float
    chosen: Candidate
    candidates: list[Candidate]
    references: list[Candidate]
    artifact: str | None = None
    report: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    eval_text: str = ""
    calib_text: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "objective": self.objective,
            "ppl_fp32": self.ppl_fp32,
            "eval_text": self.eval_text,
            "calib_text": self.calib_text,
            "chosen": self.chosen.summary() | {"plan": self.chosen.plan},
            "frontier": [c.summary() for c in self.candidates],
            "references": [c.summary() for c in self.references],
            "artifact": self.artifact,
            "seconds": self.seconds,
        }


def _counts(plan: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in plan.values():
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def greedy_path(
    units: list[Any], kl: dict[str, dict[str, float]], schemes: list[str], cost: Callable[[Any, str], int]
) -> list[tuple[str, str]]:
    """Moves (unit key, scheme) from all-fp32 to every unit at its cheapest scheme: each step the move with
    the least estimated KL added per byte saved (`cost(unit, scheme)`, scheme 'none' = fp32)."""
    cur = {u.key: "none" for u in units}
    est = {u.key: {"none": 0.0, **kl[u.key]} for u in units}
    by_key = {u.key: u for u in units}
    path: list[tuple[str, str]] = []
    while True:
        best: tuple[float, str, str] | None = None
        for k, s in cur.items():
            here = cost(by_key[k], s)
            for o in schemes:
                saved = here - cost(by_key[k], o)
                if saved <= 0:
                    continue
                r = (est[k][o] - est[k][s]) / saved
                if best is None or r < best[0]:
                    best = (r, k, o)
        if best is None:
            return path
        _, k, o = best
        cur[k] = o
        path.append((k, o))


def plan_at(
    units: list[Any], path: list[tuple[str, str]], i: int, extra: list[tuple[str, str]] | None = None
) -> dict[str, str]:
    """The plan after the first `i` moves of the path (then `extra` moves): weight name -> scheme."""
    cur = {u.key: "none" for u in units}
    for k, s in list(path[:i]) + list(extra or []):
        cur[k] = s
    return {w: cur[u.key] for u in units for w in u.weights}


@takes_progress
def tune(
    model: Any,
    target: str = "cpu",
    budget: str = "ppl+1%",
    objective: str = "size",
    *,
    max_trials: int = 12,
    out: str | None = None,
    schemes: tuple[str, ...] | list[str] = DEFAULT_SCHEMES,
    calib: str = "lee",
    eval_text: str = "lee_background",
    calib_windows: int = 2,
    eval_tokens: int = 1024,
    window: int = 256,
    references: tuple[str, ...] | list[str] = ("int8", "int4_g128"),
    speed_candidates: int = 2,
    decode_steps: int = 24,
    speed_rounds: int = 3,
    tokenizer_dir: str | None = None,
    build: bool = True,
    use_cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search a per-projection quantization plan for `model` (a name, path or transformers module): the
    smallest artifact (`objective="size"`) or the fastest decode (`"speed"`) whose held-out perplexity or
    KL stays within `budget` ('ppl+1%', 'ppl+0.5', 'kl:0.01'). At most `max_trials` plans are evaluated
    (each a perplexity run of the quantized IR on `eval_tokens` tokens of `eval_text`); the sensitivity
    analysis reads `calib_windows` windows of `calib` and is cached. With `out`, writes OUT/artifact (the
    chosen build, when `build`) and OUT/report/ (tune.json with every candidate, plan.json, frontier.png).
    `references` are single-scheme builds evaluated for comparison (not counted as trials)."""
    b = parse_budget(budget)
    if objective not in ("size", "speed"):
        raise KilnError(f"objective must be size or speed, got {objective!r}")
    if max_trials < 1:
        raise KilnError(f"max_trials must be at least 1, got {max_trials}")
    from .quant import parse_scheme

    scheme_list = list(dict.fromkeys(schemes))
    for s in scheme_list + list(references):
        if target != "mlir" and parse_scheme(s).bits not in (4, 8):
            raise KilnError(f"scheme {s}: the {target} target's kernels take 8- and 4-bit codes (int8, int4_g32, ...)")
    pool: list[Candidate] = []
    if objective == "speed" and not (build and out):
        raise KilnError("objective speed measures built artifacts: give out=... (and build=True)")
    import torch

    from .calib import perplexity_and_kl, read_text, windows
    from .models import load_model
    from .passmgr import run_pipeline
    from .sensitivity import find_units, sensitivity, unit_bytes
    from .trace import trace

    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    tok = None
    if isinstance(model, str):
        lm = load_model(model)
        module, tok, tokenizer_dir = lm.model, lm.tokenizer, tokenizer_dir or lm.folder
    elif isinstance(model, torch.nn.Module):
        module = model
        if tokenizer_dir:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        raise KilnError(f"kiln.tune needs a torch.nn.Module or a model name/path, got {type(model).__name__}")
    if tok is not None:
        calib_w = windows(tok(read_text(calib))["input_ids"], window, calib_windows)
        eval_w = windows(tok(read_text(eval_text))["input_ids"], window, max(1, eval_tokens // window))
    else:  # a module without a tokenizer (tests): token ids drawn from fixed seeds, still disjoint texts
        vocab = int(module.config.vocab_size)
        gen = torch.Generator().manual_seed(1)
        calib_w = [torch.randint(0, vocab, (window,), generator=gen).tolist() for _ in range(calib_windows)]
        eval_w = [
            torch.randint(0, vocab, (window,), generator=gen).tolist() for _ in range(max(1, eval_tokens // window))
        ]
    log.info("tracing")
    base, _ = run_pipeline(trace(module), BASE, verify_each=False)
    secs["load_trace"] = time.perf_counter() - t0
    t = time.perf_counter()
    units = find_units(base)
    kl_est = sensitivity(base, calib_w, scheme_list, use_cache=use_cache)
    secs["sensitivity"] = time.perf_counter() - t
    fixed = base.stats()["param_bytes"] - sum(unit_bytes(u, None) for u in units)  # norms, untied tables, ...
    sch = {s: parse_scheme(s) for s in scheme_list + list(references)}

    def cost(u: Any, s: str) -> int:
        return unit_bytes(u, None if s == "none" else sch[s])

    def plan_bytes(plan: dict[str, str]) -> int:
        by_w = {w: u for u in units for w in u.weights}
        seen: set[str] = set()
        total = fixed
        for w, s in plan.items():
            u = by_w[w]
            if u.key not in seen:
                seen.add(u.key)
                total += cost(u, s)
        return total

    def plan_est(plan: dict[str, str]) -> float | None:
        """The estimated KL of a plan (the sum over its units); None for a scheme the analysis left out."""
        est = [0.0 if plan[u.weights[0]] == "none" else kl_est[u.key].get(plan[u.weights[0]]) for u in units]
        return None if any(e is None for e in est) else sum(e for e in est if e is not None)

    t = time.perf_counter()
    log.info("evaluating fp32 on the held-out text")
    ppl0, _, ref = perplexity_and_kl(base, eval_w)

    def evaluate(c: Candidate) -> Candidate:
        from kiln.passes.quantize_weights import quantize_weights

        g = quantize_weights(base, plan=c.plan) if any(v != "none" for v in c.plan.values()) else base
        c.ppl, kl, _ = perplexity_and_kl(g, eval_w, ref)
        c.kl = float(kl or 0.0)
        c.within_budget = b.ok(c.ppl, c.kl, ppl0)
        log.info(
            f"{c.name}: {c.weight_bytes / 1e6:.2f} MB, ppl {c.ppl:.3f} ({100 * (c.ppl / ppl0 - 1):+.2f}%), "
            f"KL {c.kl:.5f} (estimated {'-' if c.est_kl is None else f'{c.est_kl:.5f}'}) -> "
            f"{'within' if c.within_budget else 'over'} budget"
        )
        return c

    path = greedy_path(units, kl_est, scheme_list, cost)
    cands: dict[int, Candidate] = {}

    def at(i: int) -> Candidate:
        if i not in cands:
            p = plan_at(units, path, i)
            cands[i] = evaluate(Candidate(f"path[{i}/{len(path)}]", p, plan_bytes(p), plan_est(p)))
        return cands[i]

    # the first probe: the furthest plan whose estimated KL meets the budget; then bisect on measurements
    target_kl = b.as_kl(ppl0)
    lo, hi = 0, len(path) + 1  # lo: known within budget (fp32), hi: known over (past the end)
    probe = max(
        (i for i in range(len(path) + 1) if _est_prefix(kl_est, path, i) <= target_kl),
        default=0,
    )
    trials = 0
    while hi - lo > 1 and trials < max_trials:
        i = probe if lo < probe < hi else (lo + hi) // 2
        trials += 1
        if at(i).within_budget:
            lo = i
        else:
            hi = i
        probe = -1
    best = cands.get(lo) or Candidate("fp32", plan_at(units, path, 0), plan_bytes(plan_at(units, path, 0)), 0.0)
    if best.ppl is None:
        best = evaluate(best)
    # local search: the path's later moves (past the one that broke the budget), one at a time on top of
    # the best plan; a move kept when the plan stays within budget
    extra: list[tuple[str, str]] = []
    by_key = {u.key: u for u in units}
    for k, s in path[lo + 1 :]:
        if trials >= max_trials:
            break
        cur = plan_at(units, path, lo, extra)
        if cost(by_key[k], s) >= cost(by_key[k], cur[by_key[k].weights[0]]):
            continue  # not a saving on top of the best plan
        p = plan_at(units, path, lo, extra + [(k, s)])
        trials += 1
        c = evaluate(Candidate(f"local[{trials}] {k}={s}", p, plan_bytes(p), plan_est(p), kind="local"))
        cands[-trials] = c
        if c.within_budget and c.weight_bytes < best.weight_bytes:
            extra.append((k, s))
            best = c
    secs["search"] = time.perf_counter() - t
    evaluated = sorted(cands.values(), key=lambda c: c.weight_bytes)
    t = time.perf_counter()
    refs = [Candidate("fp32", plan_at(units, path, 0), plan_bytes(plan_at(units, path, 0)), 0.0, ppl0, 0.0, True)]
    refs[0].kind = "reference"
    for s in references:
        p = {w: s for u in units for w in u.weights}
        refs.append(evaluate(Candidate(s, p, plan_bytes(p), plan_est(p), kind="reference")))
    secs["references"] = time.perf_counter() - t
    within = [c for c in evaluated if c.within_budget] or [refs[0]]
    chosen = min(within, key=lambda c: c.weight_bytes)
    artifact = None
    report: dict[str, str] = {}
    if out:
        os.makedirs(os.path.join(out, "report"), exist_ok=True)
    if objective == "speed" and out:
        t = time.perf_counter()
        pool = sorted(within, key=lambda c: c.weight_bytes)[: max(1, speed_candidates)]
        # fewer bytes is not always faster: the CPU's int8 kernel streams more weights per second than its
        # int4 kernels (docs/benchmarks.md), so the plan within budget with the most int8 weights runs too
        int8_heavy = max(within, key=lambda c: (list(c.plan.values()).count("int8"), -c.weight_bytes))
        if int8_heavy not in pool:
            pool.append(int8_heavy)
        built = []
        for i, c in enumerate(pool):
            built.append(
                _build(module, target, c.plan, os.path.join(out, "report", "builds", f"candidate{i}"), tokenizer_dir)
            )
        for _ in range(speed_rounds):  # the builds take turns, best round counts: a shared host's load hits all alike
            for c, where in zip(pool, built):
                c.decode_tok_s = max(c.decode_tok_s or 0.0, decode_tok_s(where, decode_steps))
        for c in pool:
            log.info(f"{c.name}: decode {c.decode_tok_s:.1f} tok/s")
        chosen = max(pool, key=lambda c: c.decode_tok_s or 0.0)
        secs["speed"] = time.perf_counter() - t
    if out and build:
        t = time.perf_counter()
        dst = os.path.join(out, "artifact")
        if objective == "speed":  # the chosen plan is built already: keep that build, drop the others
            import shutil

            builds = os.path.join(out, "report", "builds")
            if os.path.exists(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(builds, f"candidate{pool.index(chosen)}"), dst)
            shutil.rmtree(builds)
            artifact = os.path.abspath(dst)
        else:
            artifact = _build(module, target, chosen.plan, dst, tokenizer_dir)
        secs["build"] = time.perf_counter() - t
    secs["total"] = time.perf_counter() - t0
    res = TuneResult(
        str(b),
        objective,
        ppl0,
        chosen,
        evaluated,
        refs,
        artifact,
        report,
        {k: round(v, 2) for k, v in secs.items()},
        eval_text=f"{eval_text}: first {len(eval_w)} windows of {window} tokens",
        calib_text=f"{calib}: first {len(calib_w)} windows of {window} tokens",
    )
    if out:
        res.report = write_report(res, os.path.join(out, "report"))
    return res


def _est_prefix(kl: dict[str, dict[str, float]], path: list[tuple[str, str]], i: int) -> float:
    cur: dict[str, str] = {}
    for k, s in path[:i]:
        cur[k] = s
    return sum(kl[k][s] for k, s in cur.items())


def _build(module: Any, target: str, plan: dict[str, str], path: str, tokenizer_dir: str | None) -> str:
    from .api import compile

    quantized = any(v != "none" for v in plan.values())
    art = compile(module, target=target, quant_plan=plan if quantized else None, tokenizer_dir=tokenizer_dir)
    return art.save(path)


def decode_tok_s(path: str, steps: int = 24, prompt_tokens: int = 32) -> float:
    """Greedy decode tokens per second of an artifact at batch 1 (median step, after a warm-up)."""
    import statistics

    import numpy as np

    from .api import load

    eng = load(path, kv_cache_tokens=max(256, prompt_tokens + steps + 64))
    prompt = [(7 * i + 3) % 97 + 1 for i in range(prompt_tokens)]
    pages = eng.pool.alloc(eng.pool.pages_for(prompt_tokens + steps + 1))
    try:
        tokv = int(np.argmax(eng.prefill(prompt, pages)))
        times = []
        for s in range(steps):
            t = time.perf_counter()
            logits = eng.decode([tokv], [prompt_tokens + s], [pages])
            times.append(time.perf_counter() - t)
            tokv = int(logits.argmax(-1)[0])
        return 1.0 / statistics.median(times[2:] if len(times) > 4 else times)
    finally:
        eng.pool.release(pages)


def write_report(res: TuneResult, folder: str) -> dict[str, str]:
    """tune.json (every candidate), plan.json (the chosen plan, as quantize-weights{plan=...} reads it) and
    frontier.png (when matplotlib is installed) under `folder`."""
    os.makedirs(folder, exist_ok=True)
    files = {"tune": os.path.join(folder, "tune.json"), "plan": os.path.join(folder, "plan.json")}
    with open(files["tune"], "w") as f:
        json.dump(res.to_json(), f, indent=1)
    with open(files["plan"], "w") as f:
        json.dump(res.chosen.plan, f, indent=1)
    try:
        from .plots import plot_frontier

        files["frontier"] = plot_frontier(res, os.path.join(folder, "frontier.png"))
    except KilnError as e:  # matplotlib missing: the JSON still says everything
        log.info(f"no frontier plot: {e}")
    return files
