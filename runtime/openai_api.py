"""OpenAI-compatible HTTP server over a `Server`: /v1/chat/completions, /v1/completions, /v1/models,
/health, /metrics.

The scheduler runs on its own thread; each request's sequences stream `Delta`s into an asyncio queue
through `loop.call_soon_threadsafe`. Admission is bounded: at most max_batch + max_queue sequences are
in flight, beyond that a request gets 429 at once instead of waiting without bound. A streaming client
that disconnects cancels its sequences (their KV pages return to the pool); a non-streaming one is
checked for disconnects while it waits. On shutdown new requests get 503 while those in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from .api_format import APIError, chat_chunk, chat_logprobs, sse, text_chunk, text_logprobs, usage
from .api_schema import ChatCompletionRequest, CompletionRequest
from .decoding import Delta
from .prom_metrics import ServeMetrics
from .sampling import SamplingError, SamplingParams, per_sequence


def _error_event(run: _Run, i: int) -> str:
    """The SSE event that ends a stream whose sequence i failed (OpenAI's error shape)."""
    err = {"message": f"generation failed: {run.handles[i].error!r}", "type": "server_error", "param": None}
    return sse({"error": {**err, "code": None}})


class _Run:
    """One HTTP request's sequences (prompts x n), their handles and the queue their deltas arrive on."""

    def __init__(self, api: OpenAIServer, prompts: list[list[int]], params: SamplingParams) -> None:
        self.api, self.prompts = api, prompts
        self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self.handles: list[Any] = []
        self.size = self.left = len(prompts) * params.n
        loop = asyncio.get_running_loop()
        api.active += self.size
        try:
            for ids in prompts:
                for q in per_sequence(params):
                    i = len(self.handles)
                    listen = lambda d, i=i: loop.call_soon_threadsafe(self._deliver, i, d)
                    self.handles.append(api.server.submit(ids, q, listener=listen))
        except Exception as e:
            api.active -= self.size - len(self.handles)  # those submitted give theirs back as they end
            self.cancel()
            if isinstance(e, ValueError):
                raise APIError(400, str(e), getattr(e, "param", None) or _param_of(str(e))) from None
            raise APIError(503, f"cannot take the request: {e}") from None

    def _deliver(self, i: int, d: Delta) -> None:
        """On the event loop. A sequence's end is accounted here, not where the client reads, so that
        capacity comes back even when the client is gone before its stream started."""
        self.queue.put_nowait((i, d))
        if d.finish_reason is not None:
            self.api.active -= 1
            self.api.metrics.observe(self.handles[i].metrics)

    def _seen(self, i: int, d: Delta) -> None:
        if d.finish_reason is not None:
            self.left -= 1

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        while self.left:
            i, d = await self.queue.get()
            self._seen(i, d)
            yield i, d

    async def wait(self, request: Request) -> bool:
        """Until every sequence ends; False (and the sequences cancelled) if the client went away. One
        pending get() carries over between disconnect checks, so no delta is lost to a timeout."""
        loop = asyncio.get_running_loop()
        get: asyncio.Future | None = None
        check = loop.time() + 0.25
        while self.left:
            get = get or asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({get}, timeout=max(0.0, check - loop.time()))
            if done:
                self._seen(*get.result())
                get = None
            if loop.time() >= check:  # also while deltas keep coming: a busy stream must not hide a disconnect
                check = loop.time() + 0.25
                if await request.is_disconnected():
                    if get is not None:
                        get.cancel()
                    self.cancel()
                    return False
        return True

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done():
                h.cancel()

    def completion_tokens(self) -> int:
        return sum(len(h.completion.token_ids) for h in self.handles)


def _param_of(message: str) -> str | None:
    return "max_tokens" if "max_tokens" in message else None


class OpenAIServer:
    """The FastAPI app (`.app`) over `server`; `model_name` is what /v1/models lists and requests name."""

    def __init__(
        self,
        server: Any,
        model_name: str,
        max_queue: int = 64,
        drain_timeout_s: float = 30.0,
        close_server: bool = True,
    ) -> None:
        self.server, self.engine, self.model_name = server, server.engine, model_name
        self.capacity = server.max_batch + max_queue
        self.drain_timeout_s, self.close_server = drain_timeout_s, close_server
        self.active = 0  # sequences admitted and not yet finished
        self.draining = False
        self.created = int(time.time())
        self.metrics = ServeMetrics(server, self)
        self.app = self._build()

    # -- app --------------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="kiln", lifespan=self._lifespan)

        @app.exception_handler(APIError)
        async def _api_error(_: Request, e: APIError) -> JSONResponse:
            return e.response()

        @app.exception_handler(RequestValidationError)
        async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
            err = e.errors()[0]
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            param = ".".join(loc) or None
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            self.metrics.rejected.labels("invalid").inc()
            return APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid')}{got}", param).response()

        @app.exception_handler(HTTPException)
        async def _http(_: Request, e: HTTPException) -> JSONResponse:
            return APIError(e.status_code, str(e.detail)).response()

        @app.get("/health")
        async def health() -> JSONResponse:
            dead = self.server._dead  # the scheduler stopped (a tensor-parallel rank died): nothing runs
            if dead is not None:
                return JSONResponse({"status": "failed", "reason": str(dead)}, 503)
            return JSONResponse({"status": "draining" if self.draining else "ok"}, 503 if self.draining else 200)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models() -> dict:
            card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "kiln"}
            card["max_model_len"] = self.engine.max_context
            return {"object": "list", "data": [card]}

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request) -> Any:
            return await self._chat(body, request)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Any:
            return await self._completions(body, request)

        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        yield
        self.draining = True  # refuse new work; let what is in flight finish
        t0 = time.monotonic()
        while self.active and time.monotonic() - t0 < self.drain_timeout_s:
            await asyncio.sleep(0.02)
        if self.close_server:
            self.server.close()

    # -- shared steps -----------------------------------------------------------------------------
    def _admit(self, body: Any, prompts: list[list[int]], max_tokens: int | None, lp: int | None, fmt: Any) -> _Run:
        if self.draining:
            raise APIError(503, "the server is shutting down")
        if body.model != self.model_name:
            raise APIError(
                404,
                f"model '{body.model}' is not served here; this server serves '{self.model_name}'",
                "model",
                "model_not_found",
            )
        room = min(self.engine.max_context, self.engine.pool.num_pages * self.engine.page_size)
        if max_tokens is None:  # OpenAI's default: whatever room the context leaves
            max_tokens = max(1, room - max(len(p) for p in prompts))
        try:
            params = body.sampling(max_tokens, lp, fmt)
            params.validate()
        except SamplingError as e:
            raise APIError(400, str(e), e.param) from None
        except ValueError as e:
            raise APIError(400, str(e), "response_format") from None
        need = len(prompts) * params.n
        if self.active + need > self.capacity:
            self.metrics.rejected.labels("over_capacity").inc()
            raise APIError(
                429, f"over capacity: {self.active} sequences in flight, at most {self.capacity}; retry later"
            )
        for p in prompts:
            self.metrics.prompt.inc(len(p))
        return _Run(self, prompts, params)

    def _encode(self, prompt: Any, param: str) -> list[int]:
        try:
            ids = self.engine.encode(prompt)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param) from None
        if not ids:
            raise APIError(400, f"{param} is empty", param)
        return ids

    def _failed(self, run: _Run) -> None:
        for h in run.handles:
            if h.completion.finish_reason == "error":
                raise APIError(500, f"generation failed: {h.error!r}")

    def _stream(self, run: _Run, events: AsyncIterator[str]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for ev in events:
                    yield ev
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects and the response task is cancelled
                run.cancel()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- chat -------------------------------------------------------------------------------------
    async def _chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        try:
            msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
            lp = body.logprob_count()
        except ValueError as e:
            raise APIError(400, str(e), "messages" if "content" in str(e) else "top_logprobs") from None
        ids = self._encode(msgs, "messages")
        run = self._admit(body, [ids], body.max_completion_tokens or body.max_tokens, lp, body.response_format)
        rid, created, tok = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.engine.tokenizer
        if body.stream:
            return self._stream(run, self._chat_events(run, body, rid, created))
        if not await run.wait(request):
            return Response(status_code=499)
        self._failed(run)
        choices = []
        for i, h in enumerate(run.handles):
            c = h.completion
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(tok, c.logprobs) if c.logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                }
            )
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": self.model_name,
            "choices": choices,
            "usage": usage(len(ids), run.completion_tokens()),
        }

    async def _chat_events(self, run: _Run, body: ChatCompletionRequest, rid: str, created: int) -> AsyncIterator[str]:
        tok, model = self.engine.tokenizer, self.model_name
        for i in range(len(run.handles)):
            yield sse(
                chat_chunk(
                    rid,
                    created,
                    model,
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                )
            )
        async for i, d in run.deltas():
            if d.finish_reason == "error":
                yield _error_event(run, i)
                return
            lps = chat_logprobs(tok, [d.logprob]) if d.logprob is not None else None
            if d.text or lps or d.finish_reason:
                yield sse(
                    chat_chunk(
                        rid,
                        created,
                        model,
                        [
                            {
                                "index": i,
                                "delta": {"content": d.text} if d.text or not d.finish_reason else {},
                                "logprobs": lps,
                                "finish_reason": d.finish_reason,
                            }
                        ],
                    )
                )
        if body.include_usage:
            yield sse(chat_chunk(rid, created, model, [], usage(len(run.prompts[0]), run.completion_tokens())))

    # -- completions ------------------------------------------------------------------------------
    async def _completions(self, body: CompletionRequest, request: Request) -> Any:
        try:
            raw = body.prompts()
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None
        prompts = [self._encode(p, "prompt") for p in raw]
        run = self._admit(body, prompts, body.max_tokens, body.logprobs, body.response_format)
        rid, created, tok = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.engine.tokenizer
        n = body.n
        echo = [(p if isinstance(p, str) else tok.decode(p) if tok else "") if body.echo else "" for p in raw]
        if body.stream:
            return self._stream(run, self._text_events(run, body, rid, created, echo))
        if not await run.wait(request):
            return Response(status_code=499)
        self._failed(run)
        choices = []
        for i, h in enumerate(run.handles):
            c, pre = h.completion, echo[i // n]
            lps = text_logprobs(tok, c.logprobs, len(pre)) if c.logprobs is not None and tok else None
            choices.append({"index": i, "text": pre + c.text, "logprobs": lps, "finish_reason": c.finish_reason})
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": choices,
            "usage": usage(sum(map(len, prompts)), run.completion_tokens()),
        }

    async def _text_events(
        self, run: _Run, body: CompletionRequest, rid: str, created: int, echo: list[str]
    ) -> AsyncIterator[str]:
        tok, model, n = self.engine.tokenizer, self.model_name, body.n
        offsets = [len(echo[i // n]) for i in range(len(run.handles))]
        for i in range(len(run.handles)):
            if echo[i // n]:
                yield sse(
                    text_chunk(
                        rid,
                        created,
                        model,
                        [{"index": i, "text": echo[i // n], "logprobs": None, "finish_reason": None}],
                    )
                )
        async for i, d in run.deltas():
            if d.finish_reason == "error":
                yield _error_event(run, i)
                return
            lps = text_logprobs(tok, [d.logprob], offsets[i]) if d.logprob is not None and tok else None
            offsets[i] += len(d.text)
            if d.text or lps or d.finish_reason:
                yield sse(
                    text_chunk(
                        rid,
                        created,
                        model,
                        [{"index": i, "text": d.text, "logprobs": lps, "finish_reason": d.finish_reason}],
                    )
                )
        if body.include_usage:
            yield sse(text_chunk(rid, created, model, [], usage(sum(map(len, run.prompts)), run.completion_tokens())))


def run(
    artifact: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    kv_cache_tokens: int = 8192,
    prefill_chunk: int = 256,
    verify: bool = True,
    log_level: str = "info",
    drain_timeout_s: float = 30.0,
) -> None:
    """Load `artifact` and serve it until SIGINT/SIGTERM; requests in flight get drain_timeout_s to finish."""
    import os
    import signal

    import uvicorn

    from .engine import Engine
    from .serving import Server

    engine = Engine(artifact, kv_cache_tokens=kv_cache_tokens, verify=verify)
    server = Server(engine, max_batch=max_batch, prefill_chunk=prefill_chunk)
    name = model_name or os.path.basename(os.path.normpath(artifact))
    api = OpenAIServer(server, name, max_queue=max_queue, drain_timeout_s=drain_timeout_s)
    # uvicorn drains on SIGTERM, then raises the signal again so that the process dies of it; a drained
    # stop is a normal end here, so that second SIGTERM is only noted and `kiln serve` exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(api.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(drain_timeout_s))
