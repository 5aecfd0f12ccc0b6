"""Structured output: JSON (any object, or one schema) enforced token by token with xgrammar.

xgrammar compiles a grammar against the tokenizer's vocabulary once, then a per-request matcher fills a
bitmask of the tokens that keep the output a valid prefix ([ceil(vocab/32)] int32, bit i = token i).
Disallowed logits become -inf before sampling, so any sampling settings stay within the grammar. One
compiler per tokenizer caches compiled schemas across requests.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

_lock = threading.Lock()
_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiler(tokenizer: Any, vocab: int) -> Any:
    try:
        import xgrammar as xgr
    except ImportError as e:
        raise ValueError(
            "JSON output (response_format) needs xgrammar, which is not installed: pip install 'kiln[structured]' "
            "(it brings torch; a kiln bundle leaves both out, so serve JSON output with kiln serve from an install "
            "that has them)"
        ) from e
    with _lock:
        c = _compilers.get(tokenizer)
        if c is None:
            from transformers import PreTrainedTokenizerFast

            hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok)
            eos = tokenizer.eos_token_id
            info = xgr.TokenizerInfo.from_huggingface(
                hf, vocab_size=vocab, stop_token_ids=[eos] if eos is not None else None
            )
            c = _compilers[tokenizer] = xgr.GrammarCompiler(info, max_threads=1)
        return c


class JSONConstraint:
    """One request's grammar state: `mask` logits before sampling, `accept` each token after."""

    def __init__(self, tokenizer: Any, vocab: int, stop_ids: Sequence[int], schema: dict | str | None = None) -> None:
        comp = _compiler(tokenizer, vocab)  # first: without xgrammar it raises the error that names the fix
        import xgrammar as xgr

        try:
            # json_object asks for an object, not any JSON value; compact whitespace so that a weak model
            # cannot wander off into spaces
            text = '{"type": "object"}' if schema is None else schema if isinstance(schema, str) else json.dumps(schema)
            grammar = comp.compile_json_schema(text, any_whitespace=False)
        except Exception as e:  # xgrammar reports unsupported or malformed schemas as RuntimeError
            raise ValueError(f"cannot compile the JSON schema: {e}") from None
        stops = list(stop_ids)
        self.matcher = xgr.GrammarMatcher(
            grammar, override_stop_tokens=stops or None, terminate_without_stop_token=not stops
        )
        self.vocab = vocab
        self._bitmask = xgr.allocate_token_bitmask(1, vocab)  # [1, ceil(vocab/32)] int32

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits [vocab] -> a copy with every token the grammar forbids at -inf."""
        import xgrammar as xgr

        xgr.reset_token_bitmask(self._bitmask)
        self.matcher.fill_next_token_bitmask(self._bitmask)
        bits = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little")[: logits.shape[-1]]
        return np.where(bits.astype(bool), logits, -np.inf).astype(np.float32)

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(int(token))

    @property
    def done(self) -> bool:
        """The JSON value is complete (and its stop token taken, when there is one)."""
        return bool(self.matcher.is_terminated())
