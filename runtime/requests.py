"""A request as the serving scheduler sees it: the client's handle, and the scheduler's own state.

`RequestHandle` is what `Server.submit` returns: it streams tokens to an iterator or a callback and
holds the `Completion`. `Request` is the scheduler's record: tokens so far, KV pages, how much of the
sequence has KV written (`computed`), the request's own sampling rng, and timing for metrics.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .engine import Completion
from .errors import KilnError

if TYPE_CHECKING:
    from .serving import Server


class RequestFailed(KilnError, RuntimeError):
    """A request failed (its stream callback raised, or the engine failed on its batch)."""


class RequestHandle:
    """Streams a request's tokens: iterate it, or pass `callback(token_id)` to submit. `result()` blocks."""

    _END = object()

    def __init__(self, server: Server, rid: int, prompt_ids: list[int], callback) -> None:
        self._server, self.id, self._callback = server, rid, callback
        self._q: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self.completion = Completion(list(prompt_ids))
        self.error: BaseException | None = None
        self.metrics: dict = {}

    def __iter__(self) -> Iterator[int]:
        while True:
            t = self._q.get()
            if t is self._END:
                if self.error is not None:
                    raise RequestFailed(f"request {self.id} failed: {self.error!r}") from self.error
                return
            yield t

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self.error is not None:
            raise RequestFailed(f"request {self.id} failed: {self.error!r}") from self.error
        return self.completion

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; result() then gives the tokens so far with finish_reason 'cancelled'."""
        self._server._cancel(self.id)

    # server side
    def _push(self, tok: int) -> None:
        self.completion.token_ids.append(tok)
        self._q.put(tok)
        if self._callback is not None:
            self._callback(tok)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        self.completion.finish_reason = reason
        self.error = error
        self._q.put(self._END)
        self._done.set()


class Request:
    __slots__ = (
        "id",
        "prompt_len",
        "ids",
        "params",
        "rng",
        "handle",
        "arrival",
        "pages",
        "computed",
        "registered",
        "matched",
        "dpages",
        "dcomputed",
        "first_at",
        "finished_at",
        "state",
        "preemptions",
        "stops",
    )

    def __init__(self, rid, ids, params, handle, stops) -> None:
        self.id, self.ids, self.params, self.handle = rid, list(ids), params, handle
        self.prompt_len = len(ids)
        self.rng = np.random.default_rng(params.seed)
        self.arrival = time.perf_counter()
        self.pages: list[int] = []
        self.dpages: list[int] = []
        self.computed = self.registered = self.dcomputed = 0
        self.matched = False
        self.first_at: float | None = None
        self.finished_at: float | None = None
        self.state = "waiting"
        self.preemptions = 0
        self.stops = stops

    @property
    def pending(self) -> int:
        return len(self.ids) - self.computed

    @property
    def generated(self) -> int:
        return len(self.ids) - self.prompt_len
