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
This module is the front door (submission, the thread, metrics); the step itself is in scheduling.py.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Sequence

from .decoding import Decoder, Delta
from .engine import Completion
from .errors import RankError
from .kv_cache import PageManager
from .prompts import Prompt, as_prompt_list
from .requests import Request, RequestFailed, RequestHandle
from .sampling import SamplingParams, per_sequence
from .scheduling import Scheduling
from .server_stats import finished_stats

__all__ = ["POLICIES", "RequestFailed", "RequestHandle", "Server"]

POLICIES = ("static", "dynamic", "continuous")


class Server(Scheduling):
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
            except RankError:  # a rank of the engine's tensor-parallel group died: nothing can run any more
                raise
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
