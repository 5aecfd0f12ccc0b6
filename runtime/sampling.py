"""Token sampling: greedy, temperature, top-k, top-p, seeded per request."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature=0 is greedy; top_k=0 and top_p=1 disable those filters."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution `sample` draws from (float64 [vocab]); one-hot argmax for greedy."""
    if p.temperature == 0:
        out = np.zeros(logits.shape[-1])
        out[int(np.argmax(logits))] = 1.0
        return out
    z = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < z.shape[0]:
        kth = np.partition(z, -p.top_k)[-p.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    pr = np.exp(z)
    pr /= pr.sum()
    if p.top_p < 1.0:
        order = np.argsort(-pr)
        cum = np.cumsum(pr[order])
        keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
        mask = np.zeros_like(pr)
        mask[keep] = pr[keep]
        pr = mask / mask.sum()
    return pr


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    """logits: [vocab] float32 -> token id."""
    if p.temperature == 0:
        return int(np.argmax(logits))
    pr = probs(logits, p)
    return int(rng.choice(pr.shape[0], p=pr))
