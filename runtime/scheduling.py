"""The scheduler's step: admission by policy, page reservation and preemption, prefill chunks, decode steps
(speculative or not), and the hand-off of each token to its request. `Server` (serving.py) is this plus its
front door (submission, the background thread, metrics); the policies are described there.

A decode step's tokens drawn on the GPU are handed to their clients (text, stream, callbacks) while the next
step runs (`_emit(defer=True)`, `_flush_deferred`), so a large batch's host work hides behind the GPU's.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import RankError
from .kv_cache import OutOfPages, PageManager
from .requests import Request


class Scheduling:
    """The step of `Server`; the state it reads is set up by `Server.__init__`."""

    engine: Any
    policy: str
    max_batch: int
    prefill_chunk: int
    max_wait_s: float
    kv: PageManager
    spec: Any  # a speculator (speculative.py) or None
    waiting: collections.deque[Request]
    running: list[Request]
    _finished: list[dict]
    _deferred: list[tuple[Request, int]]
    _step_lock: Any
    _lock: Any
    _incoming: list[Request]
    _cancels: set[int]
    _t_last: float | None
    preemptions: int
    steps: int
    decode_steps: int
    prefill_tokens: int
    peak_batch: int

    def _drain(self) -> None:
        with self._lock:
            inc, self._incoming = self._incoming, []
            cancels, self._cancels = self._cancels, set()
        self.waiting.extend(inc)
        if cancels:
            for r in [r for r in self.waiting if r.id in cancels]:
                self.waiting.remove(r)
                self._finish(r, "cancelled")
            for r in [r for r in self.running if r.id in cancels]:
                self._finish(r, "cancelled")

    def step(self) -> bool:
        """One scheduler iteration. Returns False when there was nothing to run. An error that escapes the
        per-request guards fails the running requests (their pages go back) and is raised."""
        with self._step_lock:
            try:
                return self._step()
            except BaseException as e:
                for r in list(self.running):
                    self._finish(r, "error", e)
                self.running = []
                raise

    def _step(self) -> bool:
        with self._step_lock:
            self._drain()
            if self.policy == "continuous":
                self._admit_continuous()
            elif not self.running:
                self._admit_batch()
            if not self.running:
                return False
            self.steps += 1
            self.peak_batch = max(self.peak_batch, len(self.running))
            dec = [r for r in self.running if r.pending == 1 and not self._prefills(r)]
            if dec:
                self._decode(dec)
            elif self._deferred:  # no step to hide them behind
                self._flush_deferred()
            pre = [r for r in self.running if self._prefills(r)]
            budget = self.prefill_chunk if self.policy == "continuous" else None
            for r in pre:
                if r.state != "running":
                    continue
                n = r.pending if budget is None else min(r.pending, budget)
                self._prefill(r, n)
                if budget is not None:
                    budget -= n
                    if budget <= 0:
                        break
            self.running = [r for r in self.running if r.state == "running"]
            return True

    def _prefills(self, r: Request) -> bool:
        """Whether `r` has prompt tokens to prefill this step. A one-token prompt nothing was computed for
        is prefilled under the batch policies, which prefill every prompt whole, and decoded with the
        others under continuous batching."""
        return r.pending > 1 or (r.pending == 1 and r.computed == 0 and self.policy != "continuous")

    def _admit_batch(self) -> None:
        if not self.waiting:
            return
        if (
            self.policy == "dynamic"
            and len(self.waiting) < self.max_batch
            and time.perf_counter() - self.waiting[0].arrival < self.max_wait_s
        ):
            return
        avail = self.kv.available
        while self.waiting and len(self.running) < self.max_batch:
            need = self.kv.pool.pages_for(len(self.waiting[0].ids) + 1)
            if need > avail and self.running:
                break
            avail -= need
            self._start(self.waiting.popleft())

    def _admit_continuous(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]
            need = self.kv.pool.pages_for(min(len(r.ids), self.prefill_chunk) + 1)
            if self.running and self.kv.available - need < len(self.running):
                break  # keep a page per running sequence so admission does not cause preemption at once
            self._start(self.waiting.popleft())

    def _start(self, r: Request) -> None:
        r.state = "running"
        self.running.append(r)

    def _preempt(self, r: Request) -> None:
        self.kv.release(r.pages)
        if self.spec is not None:
            self.spec.release(r)
        r.pages, r.computed, r.registered, r.matched, r.state = [], 0, 0, False, "waiting"
        r.preemptions += 1
        self.preemptions += 1
        self.running.remove(r)
        self.waiting.appendleft(r)

    def _reserve(self, r: Request, positions: int, draft_k: int = 0) -> bool:
        """Pages for positions 0..positions-1, the page written first made private (copy-on-write), and
        draft pages when speculating. Preempts the newest running request while pages are short; False
        when `r` itself had to go."""
        while True:
            try:
                self.kv.ensure(r.pages, positions)
                if r.computed // self.kv.page_size < len(r.pages):
                    self.kv.writable(r.pages, r.computed // self.kv.page_size)
                if draft_k:
                    assert self.spec is not None  # draft pages are asked for only when speculating
                    self.spec.reserve_draft(r, draft_k)
                return True
            except OutOfPages:
                victim = max((x for x in self.running if x.state == "running"), key=lambda x: x.id)
                self._preempt(victim)
                if victim is r:
                    return False

    def _prefill(self, r: Request, n: int) -> None:
        if not r.matched:
            r.matched = True
            if not r.pages:
                r.pages = self.kv.match(r.ids)
                r.registered = len(r.pages)
                r.computed = min(len(r.pages) * self.kv.page_size, len(r.ids) - 1)
                n = min(n, r.pending)
                if r.pending == 1 and r.computed:
                    return  # whole prompt cached: its last token goes through decode next step
        if not self._reserve(r, r.computed + n):
            return
        try:
            t0 = time.perf_counter()
            logits = self.engine.prefill(r.ids[r.computed : r.computed + n], r.pages, start=r.computed)
            r.handle.completion.prefill_seconds += time.perf_counter() - t0
        except Exception as e:
            self._finish(r, "error", e)
            if isinstance(e, RankError):  # the engine is gone: so is the server (Server._serve)
                raise
            return
        r.computed += n
        self.prefill_tokens += n
        r.registered = self.kv.register(r.ids, r.pages, r.computed, r.registered)
        if r.pending == 0:
            try:
                tok = r.handle.decoder.pick(logits, r.ids, r.rng)
            except Exception as e:  # this request's sampling values: fail it alone
                self._finish(r, "error", e)
                return
            self._emit(r, tok)

    def _decode(self, dec: list[Request]) -> None:
        k = 0
        if self.spec is not None:
            k = min(self.spec.step_k(dec), min(r.params.max_tokens - r.generated for r in dec))
        for r in sorted(dec, key=lambda x: x.id):
            if r.state == "running":
                self._reserve(r, len(r.ids) + k, k)
        dec = [r for r in dec if r.state == "running"]
        if not dec:
            return
        self.decode_steps += 1
        try:
            if k >= 1:
                assert self.spec is not None  # k stays 0 without a speculator
                news = self.spec.step(dec, k, lambda i, row: self._sample(dec[i], row))
            else:
                on_device = getattr(self.engine, "device_sampling", False)
                kw = {"while_running": self._flush_deferred} if self._deferred else {}
                step = self.engine.decode_step(
                    [r.ids[-1] for r in dec],
                    [len(r.ids) - 1 for r in dec],
                    [r.pages for r in dec],
                    [r.handle.decoder.device_draw(r.rng) if on_device else None for r in dec],
                    **kw,
                )
        except Exception as e:
            for r in dec:
                self._finish(r, "error", e)
            if isinstance(e, RankError):
                raise
            return
        drawn = [None] * len(dec)
        if k < 1:
            drawn = step.tokens
            news = [self._sample(r, step.logits, i, step.tokens[i]) for i, r in enumerate(dec)]
        for r, new, d in zip(dec, news, drawn):
            if r.state != "running":  # failed while the step ran (its deferred tokens' callback raised)
                continue
            r.computed = len(r.ids)  # KV of the last token is written now
            for t in new:
                self._emit(r, t, defer=d is not None and not r.params.stop)
                if r.state != "running":
                    break
            if r.state == "running":
                r.computed = len(r.ids) - 1  # KV of every accepted token is written; the newest has none yet
                r.registered = self.kv.register(r.ids, r.pages, r.computed, r.registered)

    def _sample(
        self,
        r: Request,
        logits: np.ndarray | Callable[[int], np.ndarray],
        i: int | None = None,
        drawn: int | None = None,
    ) -> list[int]:
        """The request's next token: the device's draw, or sampled here from `logits` (a row, or with `i` a
        step's rows read on demand); a sampling error fails this request alone (no token)."""
        if drawn is not None:
            return [drawn]
        try:
            return [r.handle.decoder.pick(logits(i) if callable(logits) and i is not None else logits, r.ids, r.rng)]
        except Exception as e:
            self._finish(r, "error", e)
            return []

    def _emit(self, r: Request, tok: int, defer: bool = False) -> None:
        """Append a sampled token. Position len(ids)-1 has no KV yet, so computed = len(ids)-1 after.

        `defer`: the token was drawn on the device and nothing but its id decides whether the sequence goes
        on (no stop strings; the device draws no grammar-constrained token): its client-side handling (text,
        the stream, callbacks) runs while the next decode step runs on the GPU (`_flush_deferred`), so a
        large batch's host work hides behind the GPU's. It always runs before the request's end."""
        now = time.perf_counter()
        if r.first_at is None:
            r.first_at = now
        r.ids.append(tok)
        r.computed = min(r.computed, len(r.ids) - 1)
        stopped = False
        if defer:
            self._deferred.append((r, tok))
        else:
            try:
                stopped = r.handle._push(tok)  # a stop string, or a complete JSON value
            except BaseException as e:  # the client's callback, even SystemExit/KeyboardInterrupt: its request alone
                self._finish(r, "error", e)
                return
        if stopped or tok in r.stops:
            self._finish(r, "stop")
        elif r.generated >= r.params.max_tokens:
            self._finish(r, "length")

    def _flush_deferred(self) -> None:
        """The deferred tokens' client-side handling, in the order they were drawn."""
        items, self._deferred = self._deferred, []
        for r, tok in items:
            if r.handle.done():  # failed by an earlier token's callback in this flush
                continue
            try:
                r.handle._push(tok)
            except BaseException as e:  # the client's callback: its request alone
                self._finish(r, "error", e)

    def _finish(self, r: Request, reason: str, error: BaseException | None = None) -> None:
        if self._deferred:  # its tokens reach the client before its end
            self._flush_deferred()
        if r.state == "done":
            return
        if r.state == "running":
            self.kv.release(r.pages)
            if self.spec is not None:
                self.spec.release(r)
            r.pages = []
        r.state = "done"
        r.finished_at = now = time.perf_counter()
        self._t_last = now
        n = r.generated
        self._finished.append(
            {
                "id": r.id,
                "prompt_tokens": r.prompt_len,
                "output_tokens": n,
                "finish_reason": reason,
                "ttft_s": r.first_at - r.arrival if r.first_at is not None else None,
                "tpot_s": (now - r.first_at) / (n - 1) if r.first_at is not None and n > 1 else None,
                "latency_s": now - r.arrival,
                "preemptions": r.preemptions,
            }
        )
        h = r.handle
        h.metrics = self._finished[-1]
        h._finish(reason, error)
