"""Serving runtime: a request scheduler over one Engine with a paged, prefix-cached KV cache.

    server = Server(engine, policy="continuous", max_batch=16, prefill_chunk=256, max_wait_s=0.01, draft=None)
    # draft: None, a smaller Engine (speculative.py) or "ngram" (prompt lookup, ngram.py)
    h = server.submit("prompt or ids", SamplingParams(max_tokens=64), callback=lambda tok: ...)
    for tok in h: ...            # streams token ids; h.result() blocks for the Completion; h.cancel()
    outs = server.generate([...], params)        # list[Completion], in order
    server.metrics()             # TTFT, TPOT, tokens/s, KV pages, preemptions, prefix hits, acceptance
    server.close()

Policies:
- `static`: fixed batches of up to max_batch in arrival order; every prompt of the batch is prefilled whole
  (a one-token prompt too), then the batch decodes to completion before the next batch starts.
  `Engine.generate` runs its batch through this policy (runtime/static_batch.py).
- `dynamic`: like static, but a batch starts only when max_batch requests wait or the oldest has waited
  max_wait_s.
- `continuous`: iteration-level. Between decode steps, finished requests leave and waiting ones join. Each
  step runs one decode step of every decoding request and at most `prefill_chunk` prompt tokens of the
  requests still prefilling, so a long prompt never stalls the others for more than one chunk.

KV pages are allocated lazily (a page when a sequence first writes into it). When none is left the newest
running request is preempted: its pages are released and it goes back to the front of the queue, to be
recomputed later (prompt + tokens so far; its full pages usually come back from the prefix cache).
With `background=True` (default) a thread runs the scheduler; with `background=False` call `step()` (or
`generate`, which steps until its requests are done). Every public method is safe from several threads.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from .decoding import Decoder, Delta
from .engine import Completion
from .kv_cache import OutOfPages, PageManager
from .prompts import Prompt, as_prompt_list
from .requests import Request, RequestFailed, RequestHandle
from .sampling import SamplingParams, per_sequence
from .server_stats import finished_stats

__all__ = ["POLICIES", "RequestFailed", "RequestHandle", "Server"]

POLICIES = ("static", "dynamic", "continuous")


class Server:
    """Schedules requests over one Engine by a policy (see the module docstring), sharing its page pool."""

    def __init__(
        self,
        engine,
        policy: str = "continuous",
        max_batch: int = 16,
        prefill_chunk: int = 256,
        max_wait_s: float = 0.01,
        draft=None,
        spec_k: int = 4,
        spec_k_max: int = 8,
        spec_adaptive: bool = True,
        prefix_caching: bool = True,
        background: bool = True,
        chat: bool = False,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy '{policy}': choose one of {', '.join(POLICIES)}")
        if max_batch < 1 or prefill_chunk < 1 or max_wait_s < 0:
            raise ValueError("max_batch and prefill_chunk must be >= 1 and max_wait_s >= 0")
        if getattr(engine, "state_slots", None) is not None:  # a live sequence holds one state slot
            max_batch = min(max_batch, engine.state_slots.num_slots)
        self.engine, self.policy, self.max_batch = engine, policy, max_batch
        self.prefill_chunk, self.max_wait_s, self.chat = prefill_chunk, max_wait_s, chat
        # a state-space layer's state summarizes its whole prefix: no page of a prefix can be shared
        prefix_caching = prefix_caching and not engine.kv_layout.state
        self.kv = PageManager(engine.pool, engine.kv_layout.copy_page, prefix_caching)
        self.spec = None
        if draft is not None:  # a draft Engine, or "ngram" for prompt lookup
            from .speculative import make_speculator

            self.spec = make_speculator(engine, draft, spec_k, spec_k_max, spec_adaptive)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # incoming queue, cancellations
        self._step_lock = threading.RLock()  # scheduler state
        self._wake = threading.Condition(self._lock)
        self._incoming: list[Request] = []
        self._cancels: set[int] = set()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._finished: list[dict] = []
        self.preemptions = self.steps = self.decode_steps = self.prefill_tokens = 0
        # tokens drawn on the device whose client-side handling (text, queue, callbacks) waits for the next
        # decode step to run on the GPU: `_emit(defer=True)`, `_flush_deferred`
        self._deferred: list[tuple[Request, int]] = []
        self.peak_batch = 0
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._closed = False
        self._dead: BaseException | None = None  # why the scheduler thread stopped, if it did
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="kiln-server", daemon=True)
            self._thread.start()

    # -- public API -------------------------------------------------------------------------------
    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams = SamplingParams(),
        callback: Callable[[int], None] | None = None,
        chat: bool | None = None,
        listener: Callable[[Delta], None] | None = None,
    ) -> RequestHandle:
        """Queue one sequence (params.n must be 1: `generate` fans n out); refuses (ValueError) one that
        can never run. `callback(token)` and `listener(delta)` see each token on the scheduler thread, for a
        token drawn on the GPU while the next decode step runs, under the engine's lock: they must not wait on
        another thread's use of the engine. Returns its handle."""
        self._refuse_if_closed()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        if params.n != 1:
            raise ValueError(f"submit makes one sequence, got n={params.n}: submit per_sequence(params) each")
        if self.spec is not None and not self.spec.serves(params):
            raise ValueError(
                "speculative decoding samples without penalties, logprobs or JSON constraints: "
                "serve those requests on a Server without a draft model"
            )
        eng = self.engine
        ids = eng.encode(prompt, self.chat if chat is None else chat)
        eng._check(ids, params, 0)
        need = len(ids) + params.max_tokens
        draft = getattr(self.spec, "draft", None)
        for e, what in ((eng, "engine"),) + (((draft, "draft engine"),) if draft is not None else ()):
            if e.pool.pages_for(need) > e.pool.num_pages:
                raise ValueError(
                    f"this request needs {e.pool.pages_for(need)} KV pages ({need} positions) but the "
                    f"{what}'s whole pool has {e.pool.num_pages}: shorten it or load with a larger "
                    "kv_cache_tokens"
                )
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eng.eos_ids))
        rid = next(self._ids)
        h = RequestHandle(self, rid, ids, callback, Decoder(eng, ids, params, stops), listener)
        r = Request(rid, ids, params, h, stops)
        with self._lock:  # checked again where the request is queued: close() may have run meanwhile
            self._refuse_if_closed()
            self._incoming.append(r)
            if self._t_first is None:
                self._t_first = r.arrival
            self._wake.notify()
        return h

    def _refuse_if_closed(self) -> None:
        if self._dead is not None:
            raise RuntimeError(
                f"the server's scheduler stopped ({self._dead!r}); it runs no more requests: close it and "
                "start a new Server"
            )
        if self._closed:
            raise RuntimeError("the server is closed: submit to a new Server")

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    ) -> list[Completion]:
        """Every prompt (any form Engine.generate takes) with its params; n completions per prompt, in order."""
        prompts = as_prompt_list(prompts)
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        handles = [self.submit(p, q) for p, sp in zip(prompts, plist) for q in per_sequence(sp)]
        for h, j in zip(handles, (j for sp in plist for j in range(sp.n))):
            h.completion.index = j
        if self._thread is None:
            self._run(handles)
        return [h.result() for h in handles]

    def _run(self, handles: list[RequestHandle], fail_fast: bool = False) -> None:
        """Step on the caller's thread until every handle is done. With `fail_fast`, the first failed
        request's own exception is raised as soon as the step that failed it ends."""
        while not all(h.done() for h in handles):
            did = self.step()
            if fail_fast:
                error = next((h.error for h in handles if h.error is not None), None)
                if error is not None:
                    raise error
            if not did:
                time.sleep(0.001)

    def close(self) -> None:
        """Stop the scheduler thread; unfinished requests are cancelled."""
        with self._lock:
            self._closed = True
            self._cancels.update(r.id for r in self._incoming)
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        with self._step_lock:
            self._cancels.update(r.id for r in list(self.waiting) + self.running)
            self._drain()
            self._flush_deferred()
            self.kv.clear_cache()  # give cached pages back to the engine's pool

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def metrics(self) -> dict:
        with self._step_lock:
            m: dict = {"policy": self.policy}
            m.update(finished_stats(self._finished, self._t_first, self._t_last))
            m.update(
                requests_waiting=len(self.waiting) + len(self._incoming),
                requests_running=len(self.running),
                prefill_tokens_computed=self.prefill_tokens,
                preemptions=self.preemptions,
                steps=self.steps,
                decode_steps=self.decode_steps,
                peak_batch=self.peak_batch,
            )
            m.update(self.kv.stats())
            q = self.kv.query_tokens
            m["prefix_hit_rate"] = self.kv.hit_tokens / q if q else 0.0
            if self.spec is not None:
                m.update(self.spec.stats())
            return m

    def request_metrics(self) -> list[dict]:
        with self._step_lock:
            return list(self._finished)

    # -- scheduler --------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the thread is ending: say why to every client instead of leaving them hanging
            self._die(e)

    def _die(self, e: BaseException) -> None:
        """The scheduler thread stopped: fail every request it held or would have run, refuse new ones."""
        with self._lock:
            self._dead = e
            inc, self._incoming = self._incoming, []
        with self._step_lock:
            for r in inc + list(self.waiting) + list(self.running):
                self._finish(r, "error", RuntimeError(f"the server's scheduler stopped: {e!r}"))
            self.waiting.clear()
            self.running = []

    def _serve(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
            try:
                did = self.step()
            except Exception:  # a scheduler bug: step() failed what was in flight; keep serving the rest
                did = False
            if not did:
                with self._lock:
                    if self._closed:
                        return
                    if not self._incoming and not self._cancels:
                        self._wake.wait(timeout=max(1e-3, self.max_wait_s / 4) if self.waiting else 0.5)

    def _cancel(self, rid: int) -> None:
        with self._lock:
            self._cancels.add(rid)
            self._wake.notify()

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
