"""Engine.generate's batch: one static batch through the serving scheduler, stepped on the caller's thread."""

from __future__ import annotations

from collections.abc import Callable

from .engine import Completion
from .sampling import SamplingParams
from .serving import Server


def run_static_batch(
    engine,
    prompts: list[list[int]],
    params: list[SamplingParams],
    callbacks: list[Callable[[int], None] | None],
    draft=None,
) -> list[Completion]:
    """Engine.generate's batch: checked requests run as one static batch, stepped on the caller's thread.

    The caller has checked that every page the batch needs is free, so nothing is preempted. Prefix
    caching is off: every prompt is computed whole, as a batch alone on the engine would compute it, and
    no page is ever copied. A failed request (its callback raised, or the engine did) stops the batch
    and its own exception propagates; every page goes back to the engine's pool either way."""
    srv = Server(engine, policy="static", max_batch=len(prompts), prefix_caching=False, background=False, draft=draft)
    try:
        handles = [srv.submit(ids, p, callback=cb) for ids, p, cb in zip(prompts, params, callbacks)]
        srv._run(handles, fail_fast=True)
    finally:
        srv.close()
    return [h.completion for h in handles]
