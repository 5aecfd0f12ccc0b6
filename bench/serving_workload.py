"""The serving benchmark's workload and its replay through `Server` (bench/serving.py drives it).

A workload is fixed by its seed: prompt and output lengths, prompt tokens and the *shape* of the arrival
process are drawn once; a request rate only rescales the gaps between arrivals. Every policy, rate and
repeat therefore replays the same requests in the same order, and rates differ by load alone.

Lengths (tokens) are log-normal, which is how chat traffic looks: most requests are short and a few are
long. Prompts: median `prompt_median`, sigma 1.0 (the 99th percentile is ~10x the median), clipped to
[4, prompt_max]. Outputs: median `output_median`, sigma 0.7 (a short chat answer; the 99th percentile
~5x the median), clipped to [4, output_max]. Arrivals: a Poisson process (exponential gaps).

Imports nothing from kiln at module level; `replay` needs only kiln's runtime.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

PROMPT_SIGMA = 1.0
OUTPUT_SIGMA = 0.7
MIN_TOKENS = 4


@dataclass(frozen=True)
class Shape:
    """What a workload is drawn from; recorded in the results so a figure says what it was measured on."""

    requests: int = 48
    prompt_median: int = 80
    prompt_max: int = 1024
    output_median: int = 64
    output_max: int = 384
    prefix_tokens: int = 0  # > 0: every prompt starts with the same system prompt of this many tokens
    seed: int = 0


@dataclass
class Workload:
    """Requests as (prompt ids, max_tokens) with unit-rate arrival times; `at(rate)` gives the schedule."""

    shape: Shape
    prompts: list[list[int]]
    outputs: list[int]
    unit_arrivals: np.ndarray  # [requests] seconds at 1 request/s, the first at 0
    stats: dict = field(default_factory=dict)

    def at(self, rate: float) -> list[tuple[float, list[int], int]]:
        """(arrival seconds, prompt, max_tokens) per request at `rate` requests/s (0: all at once)."""
        arr = self.unit_arrivals / rate if rate > 0 else np.zeros(len(self.prompts))
        return [(float(a), p, o) for a, p, o in zip(arr, self.prompts, self.outputs)]


def _lognormal(rng: np.random.Generator, n: int, median: int, sigma: float, hi: int) -> np.ndarray:
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, size=n)), MIN_TOKENS, max(hi, MIN_TOKENS)).astype(int)


def make_workload(shape: Shape, tokens: Callable[[np.random.Generator, int], list[int]]) -> Workload:
    """Draw the workload. `tokens(rng, n)` gives n prompt tokens (a corpus slice, or random ids). With
    `prefix_tokens`, each prompt is one shared system prompt followed by its own user part whose length is
    drawn from the prompt spread."""
    rng = np.random.default_rng(shape.seed)
    plens = _lognormal(rng, shape.requests, shape.prompt_median, PROMPT_SIGMA, shape.prompt_max)
    olens = _lognormal(rng, shape.requests, shape.output_median, OUTPUT_SIGMA, shape.output_max)
    gaps = rng.exponential(1.0, size=shape.requests)
    unit = np.cumsum(gaps) - gaps[0]
    system = tokens(rng, shape.prefix_tokens) if shape.prefix_tokens else []
    prompts = [system + tokens(rng, int(p)) for p in plens]
    total = [len(p) for p in prompts]
    stats = {
        "prompt_tokens_mean": float(np.mean(total)),
        "prompt_tokens_p50": float(np.median(total)),
        "prompt_tokens_p99": float(np.percentile(total, 99)),
        "output_tokens_mean": float(np.mean(olens)),
        "output_tokens_p50": float(np.median(olens)),
        "output_tokens_p99": float(np.percentile(olens, 99)),
    }
    if shape.prefix_tokens:
        stats["shared_prefix_share"] = float(shape.prefix_tokens * len(total) / sum(total))
    return Workload(shape, prompts, [int(o) for o in olens], unit, stats)


def replay(
    engine,
    policy: str,
    reqs: Sequence[tuple[float, list[int], int]],
    max_batch: int,
    prefill_chunk: int,
    max_wait_s: float,
    prefix_caching: bool = True,
) -> dict:
    """Submit `reqs` at their arrival times to a fresh Server (a client thread sleeps until each arrival);
    returns Server.metrics() when all are done, with the greedy outputs under "outputs"."""
    from kiln.runtime.sampling import SamplingParams
    from kiln.runtime.serving import Server

    srv = Server(
        engine,
        policy=policy,
        max_batch=max_batch,
        prefill_chunk=prefill_chunk,
        max_wait_s=max_wait_s,
        prefix_caching=prefix_caching,
    )
    handles = []

    def client() -> None:
        t0 = time.perf_counter()
        for at, prompt, n in reqs:
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
            handles.append(srv.submit(prompt, SamplingParams(max_tokens=n, ignore_eos=True)))

    th = threading.Thread(target=client)
    th.start()
    th.join()
    try:
        outs = [h.result() for h in handles]
        m = srv.metrics()
    finally:
        srv.close()
    short = [i for i, (o, r) in enumerate(zip(outs, reqs)) if len(o.token_ids) != r[2]]
    if short:  # ignore_eos: every request must run to its length, or the policies did not do the same work
        raise RuntimeError(f"{policy}: requests {short[:5]} stopped before max_tokens; the figures would mislead")
    m["outputs"] = [o.token_ids for o in outs]
    return m


def warm_up(engine, max_batch: int) -> None:
    """Run a decode step at every batch size up to max_batch once, so the timed runs do not pay first-use
    costs (on the GPU: a CUDA graph is captured per batch size)."""
    pages = engine.pool.alloc(1)
    try:
        engine.prefill([1, 2], pages)
        for b in range(1, max_batch + 1):
            engine.decode([1] * b, [1] * b, [pages] * b)  # every row writes the same slot: harmless here
    finally:
        engine.pool.release(pages)


def sustainable_rate(rates: Sequence[float], p99s: Sequence[float | None], limit: float) -> dict:
    """The highest rate whose p99 TTFT stays under `limit`, from a sweep (None: not run, counts as over).

    `highest_passing`: the highest swept rate below which every swept rate passed too.
    `interpolated`: between that rate and the next (failing) one, where the straight line through their p99
    TTFTs crosses the limit; the highest passing rate when none above it failed, 0 when the lowest failed.
    """
    order = sorted(range(len(rates)), key=lambda i: rates[i])
    best, nxt = None, None
    for i in order:
        p = p99s[i]
        if p is not None and p <= limit:
            best = i
        else:
            nxt = i
            break
    if best is None:
        return {"highest_passing": 0.0, "interpolated": 0.0, "saturated_in_sweep": True}
    out = {"highest_passing": float(rates[best]), "interpolated": float(rates[best])}
    out["saturated_in_sweep"] = nxt is not None
    if nxt is not None and p99s[nxt] is not None:
        p0, p1 = float(p99s[best]), float(p99s[nxt])  # type: ignore[arg-type]
        r0, r1 = float(rates[best]), float(rates[nxt])
        out["interpolated"] = r0 + (r1 - r0) * (limit - p0) / (p1 - p0) if p1 > p0 else r0
    return out


FIGURES = ("tokens_per_s", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "tpot_p99_s", "wall_s")
COUNTS = (
    "requests_finished",
    "pages_peak_used",
    "preemptions",
    "prefix_hit_tokens",
    "prefix_hit_rate",
    "peak_batch",
    "steps",
    "decode_steps",
    "prefill_tokens_computed",
)


def median_of(runs: list[dict]) -> dict:
    """Each figure's median over the repeats (the per-run values are kept under "runs")."""
    out: dict = {}
    for k in FIGURES + COUNTS:
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = float(np.median(vals)) if vals else None
    out["runs"] = [{k: r.get(k) for k in FIGURES + COUNTS} for r in runs]
    return out
