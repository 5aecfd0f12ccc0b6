"""A request as the serving scheduler sees it: the client's handle, and the scheduler's own state.

`RequestHandle` is what `Server.submit` returns: it streams token ids or text deltas to an iterator, a
callback or a listener, and holds the `Completion`. `Request` is the scheduler's record: tokens so far,
KV pages, how much of the sequence has KV written (`computed`), the request's own sampling rng, and timing for metrics.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from .decoding import Decoder, Delta
from .engine import Completion
from .errors import KilnError

if TYPE_CHECKING:
    from .serving import Server


class RequestFailed(KilnError, RuntimeError):
    """A request failed (its stream callback raised, or the engine failed on its batch)."""


class RequestHandle:
    """Streams a request: iterate it for token ids, or `deltas()` for text deltas (see decoding.Delta);
    or pass `callback(token_id)` / `listener(delta)` to submit, called on the scheduler thread.
    `result()` blocks for the Completion."""

    _END = object()

    def __init__(
        self,
        server: Server,
        rid: int,
        prompt_ids: list[int],
        callback: Callable[[int], None] | None,
        decoder: Decoder,
        listener: Callable[[Delta], None] | None = None,
    ) -> None:
        self._server, self.id, self._callback = server, rid, callback
        self.decoder, self._listener = decoder, listener
        self._q: queue.SimpleQueue = queue.SimpleQueue()  # put from the scheduler, get from the client
        self._done = threading.Event()
        self.completion = Completion(list(prompt_ids))
        self.error: BaseException | None = None
        self.metrics: dict = {}

    def __iter__(self) -> Iterator[int]:
        for d in self.deltas():
            if d.token_id is not None:
                yield d.token_id

    def deltas(self) -> Iterator[Delta]:
        """Each token's Delta as it is produced, then a last one with the held-back text and finish_reason.
        The texts joined are the completion's text. Iterate either this or the handle, not both."""
        while True:
            d = self._q.get()
            if d is self._END:
                if self.error is not None:
                    raise RequestFailed(f"request {self.id} failed: {self.error!r}") from self.error
                return
            yield d

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
    def _push(self, tok: int) -> bool:
        """Record a token; True when a stop string or the grammar ended the sequence with it."""
        d = self.decoder.push(tok)
        self.completion.token_ids.append(tok)
        self._q.put(d)
        if self._callback is not None:
            self._callback(tok)
        if self._listener is not None:
            self._listener(d)
        return self.decoder.stopped

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        d = self.decoder.finish(reason)
        c = self.completion
        c.finish_reason, c.text, c.logprobs = reason, self.decoder.text, self.decoder.logprobs
        self.error = error
        self._q.put(d)
        self._q.put(self._END)
        self._done.set()
        if self._listener is not None:
            try:
                self._listener(d)
            except Exception:  # the request is over; a failing listener must not break the scheduler
                pass


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
