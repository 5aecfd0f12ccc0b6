"""Incremental detokenization with stop strings: text deltas as tokens arrive.

Decoding one token at a time is wrong in two ways: a character can span several byte-level tokens (a
lone token decodes to U+FFFD), and some tokenizers decode a token differently after its neighbours
(SentencePiece's leading space). So each step decodes a short window ending at the newest token and
emits only what the window added, and waits while the window ends in an incomplete character.

Stop strings: the text is cut before the first stop string and generation ends there. Text that could
still become the start of a stop string is held back until the next tokens decide, so a stream never
shows text that the final result does not contain.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

_CONTEXT = 5  # prompt tokens decoded before the first output token, for tokenizers whose spacing depends on it


class Detokenizer:
    """Turns a request's output tokens into text deltas; `text` is the text so far (cut at a stop)."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        stop: Iterable[str] = (),
        skip_ids: Iterable[int] = (),
    ) -> None:
        self.tok = tokenizer
        self.stop = tuple(stop)
        self.skip = frozenset(skip_ids)  # stop tokens: they end the output and are not part of its text
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0  # ids[prefix:read] decode to text already counted
        self.read = len(self.ids)
        self.text = ""
        self.sent = 0  # characters of `text` handed out as deltas
        self.stopped: str | None = None  # the stop string that ended the text

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def add(self, token: int) -> str:
        """Take the next token; returns the text that can be shown now (possibly empty)."""
        if self.stopped is not None or token in self.skip:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # an incomplete character (or a token with no text): wait for the next
        self._append(now[len(before) :])
        self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is held back (a partial stop string, bytes of an unfinished
        character) becomes text."""
        if self.stopped is None and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            now = self._decode(self.ids[self.prefix :])
            self._append(now[len(before) :])
            self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        if not self.stop:
            return
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits)
            self.text, self.stopped = self.text[:i], s

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final and self.stopped is None:
            end -= _held(self.text, self.stop)
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


def _held(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of some stop string (it may yet complete)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
