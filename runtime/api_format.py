"""OpenAI response shapes: errors, chat and text completions (whole and as stream chunks), logprobs."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

from .decoding import TokenLogprob


class APIError(Exception):
    """A refusal the client gets as OpenAI's error JSON: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {
            400: "invalid_request_error",
            404: "not_found_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(self.status, "server_error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _tok(tokenizer: Any, tid: int) -> str:
    return tokenizer.token_text(tid)


def chat_logprobs(tokenizer: Any, lps: list[TokenLogprob]) -> dict:
    """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def entry(tid: int, lp: float) -> dict:
        t = _tok(tokenizer, tid)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(i, v) for i, v in x.top]} for x in lps]}


def text_logprobs(tokenizer: Any, lps: list[TokenLogprob], offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [_tok(tokenizer, x.token_id) for x in lps]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [x.logprob for x in lps],
        "top_logprobs": [{_tok(tokenizer, i): v for i, v in x.top} for x in lps],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_chunk(rid: str, created: int, model: str, choices: list[dict], use: dict | None = None) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def text_chunk(rid: str, created: int, model: str, choices: list[dict], use: dict | None = None) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
