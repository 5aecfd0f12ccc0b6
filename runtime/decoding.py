"""A request's per-token decoding state: sampling with history, grammar, logprobs and text deltas.

The scheduler asks `pick(logits, ids, rng)` for each new token and hands it to `push(token)`; both run
on the scheduler thread. What the client sees of a token is a `Delta`: its id, the text it released
(see detokenize.py), and its logprobs when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .sampling import SamplingParams, logprobs, sample


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the `top` most likely alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """What one step adds to a stream. token_id is None for the text released when generation ends;
    finish_reason is set on the last delta only."""

    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


class Decoder:
    """Sampling state and text of one sequence. `stopped` turns true when a stop string or the grammar
    ended it (stop tokens are the scheduler's own check)."""

    def __init__(self, engine: Any, prompt_ids: Sequence[int], params: SamplingParams, stops: frozenset[int]) -> None:
        self.params = params
        self.prompt_len = len(prompt_ids)
        self.prompt = list(prompt_ids) if params.repetition_penalty != 1.0 else []
        tok = engine.tokenizer
        if (params.stop or params.json_schema is not None or params.json_object) and tok is None:
            raise ValueError("stop strings and JSON output need text: this artifact has no tokenizer")
        self.detok = None
        if tok is not None:
            from .detokenize import Detokenizer

            self.detok = Detokenizer(tok, prompt_ids, params.stop, skip_ids=stops)
        self.grammar = None
        if params.json_schema is not None or params.json_object:
            from .grammar import JSONConstraint

            vocab = int(engine.manifest.get("model", {}).get("vocab_size") or tok.vocab_size)
            self.grammar = JSONConstraint(tok, vocab, sorted(stops), params.json_schema)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self._last: TokenLogprob | None = None
        self.stopped = False

    def pick(self, logits: np.ndarray, ids: Sequence[int], rng: np.random.Generator) -> int:
        """The next token from logits [vocab]; `ids` is prompt + output so far (penalties read it)."""
        p = self.params
        masked = self.grammar.mask(logits) if self.grammar is not None else logits
        tok = sample(masked, p, rng, self.prompt, ids[self.prompt_len :] if p.penalized else ())
        if self.logprobs is not None:
            lp, top = logprobs(logits, tok, p.logprobs or 0)
            self._last = TokenLogprob(tok, lp, top)
        return tok

    def device_draw(self, rng: np.random.Generator) -> tuple[float, int] | None:
        """(temperature, key) when the device may draw the next token alone (`Engine.decode_step`): nothing
        here reads the logits (no grammar, penalty, filter or logprobs). The key comes from the sequence's
        own generator, so a seeded request repeats on the same engine."""
        p = self.params
        if self.grammar is not None or self.logprobs is not None or p.penalized:
            return None
        if p.min_p > 0 or p.top_k > 0 or p.top_p < 1.0:
            return None
        return (0.0, 0) if p.temperature == 0 else (float(p.temperature), int(rng.integers(0, 2**31 - 1)))

    def push(self, token: int) -> Delta:
        """Record a sampled token; returns what the stream shows for it."""
        lp, self._last = self._last, None
        if self.logprobs is not None:
            lp = lp if lp is not None and lp.token_id == token else TokenLogprob(token, float("nan"))
            self.logprobs.append(lp)
        if self.grammar is not None:
            self.grammar.accept(token)
            self.stopped |= self.grammar.done
        text = ""
        if self.detok is not None:
            text = self.detok.add(token)
            self.stopped |= self.detok.stopped is not None
        return Delta(token, text, lp)

    def finish(self, reason: str) -> Delta:
        """The last delta: text held back until now (none after a stop string), and the reason."""
        return Delta(None, self.detok.flush() if self.detok is not None else "", None, reason)

    @property
    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""
