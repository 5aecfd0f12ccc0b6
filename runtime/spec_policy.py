"""When speculation pays: the measured cost of a verify step, each request's acceptance, the draft length.

A verify step of k draft tokens runs k+1 tokens through the target; a decode step runs one. On a CPU
at batch 1 both read every weight once, so verify(k) costs little more than decode for small k, and
speculating pays whenever enough drafts are accepted. How much more it costs depends on the machine and
the artifact, so `step_costs` measures it once per engine (and caches it): decode and verify(1..k_max)
on a one-page sequence, the fastest of a few interleaved repetitions each.

Acceptance is modelled as geometric: each draft token is accepted with probability `a` given that the
tokens before it were. `Acceptance` estimates `a` per request from accepted tokens and rejections
(an exponential moving average, so it follows a request that changes from copying to writing). The
expected tokens a verify of k drafts yields is 1 + a + a^2 + ... + a^k; `choose_k` picks the k with the
most tokens per unit of cost, and 0 (plain decoding) unless speculating beats it by a margin.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

# speculate only when the model expects >= 15% more tokens per second than plain decoding: the costs are
# measured on a short sequence at a quiet moment, and a verify step slows more than a decode step under load
MARGIN = 1.15
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class StepCosts:
    """Seconds per step: `decode` one token, `verify[k]` k draft tokens (k+1 tokens); verify[0] == decode."""

    decode: float
    verify: tuple[float, ...]

    def ratio(self, k: int) -> float:
        """Cost of a verify step of k drafts relative to a decode step (1.0 for k = 0)."""
        return self.verify[min(k, len(self.verify) - 1)] / self.decode if k else 1.0


def step_costs(engine, k_max: int, reps: int = 3) -> StepCosts:
    """Measure (once per engine and k_max, then cached) decode and verify(1..k_max) at batch 1.

    Steps are interleaved so load from other processes hits every k alike, and the fastest repetition
    of each is kept. Costs are made non-decreasing in k (a longer verify never costs less: a smaller
    figure is noise). When the pool has no free page for the probe, a conservative default is used."""
    got = _COSTS.get(engine)
    if got is not None and len(got.verify) > k_max:
        return got
    pool = engine.pool
    need = pool.pages_for(k_max + 2)
    if len(pool.free) < need:
        return StepCosts(1.0, tuple(1.0 + 0.25 * k for k in range(k_max + 1)))
    pages = pool.alloc(need)
    best = [float("inf")] * (k_max + 1)
    try:
        engine.decode([0], [0], [pages])  # warm up: first calls pay for lazy initialization
        engine.verify([[0, 0]], [[0, 1]], [pages])
        for _ in range(reps):
            for k in range(k_max + 1):
                t = time.perf_counter()
                if k == 0:
                    engine.decode([0], [0], [pages])
                else:
                    engine.verify([[0] * (k + 1)], [list(range(k + 1))], [pages])
                best[k] = min(best[k], time.perf_counter() - t)
    finally:
        pool.release(pages)
    for k in range(1, k_max + 1):
        best[k] = max(best[k], best[k - 1])
    costs = StepCosts(best[0], tuple(best))
    _COSTS[engine] = costs
    return costs


class Acceptance:
    """Per-request estimate of `a`, the chance a draft token is accepted after its predecessors were.

    Each accepted draft token is a success, each rejection a failure; both decay by `decay` per update
    so recent behaviour counts most. The prior (half a success in one trial) lets a new request try."""

    def __init__(self, decay: float = 0.9, prior: tuple[float, float] = (0.5, 1.0)) -> None:
        self.decay = decay
        self.successes, self.trials = prior

    def update(self, accepted: int, rejected: bool) -> None:
        self.successes = self.decay * self.successes + accepted
        self.trials = self.decay * self.trials + accepted + int(rejected)

    @property
    def rate(self) -> float:
        return self.successes / self.trials if self.trials > 0 else 0.0


def expected_tokens(a: float, k: int) -> float:
    """Tokens a verify of k drafts yields on average when each is accepted with chance `a`: 1 + a + ... + a^k."""
    return sum(a**i for i in range(k + 1))


def choose_k(rates: Sequence[float], lengths: Sequence[int], costs: StepCosts, k_max: int) -> int:
    """The draft length for one batched step: rows with acceptance `rates` and drafts of at most `lengths`
    tokens. Maximizes expected tokens per unit of cost (the batch-1 cost ratios); 0 = plain decoding."""
    return best_k(rates, lengths, costs, k_max)[0]


def best_k(
    rates: Sequence[float], lengths: Sequence[int], costs: StepCosts, k_max: int, draft_cost: float = 0.0
) -> tuple[int, float]:
    """(k, expected tokens per decode-step of cost) of the best draft length; k = 0 unless it beats plain
    decoding by MARGIN. `draft_cost`: what making one draft token costs, in target decode steps (0 for
    prompt lookup; a draft model's decode step over the target's)."""
    best_k, best = 0, float(len(rates)) * MARGIN
    for k in range(1, k_max + 1):
        gain = sum(expected_tokens(a, min(k, m)) for a, m in zip(rates, lengths)) / (costs.ratio(k) + k * draft_cost)
        if gain > best:
            best_k, best = k, gain
    return best_k, best
