"""Token sampling with vLLM's parameter names and meanings, seeded per request.

The order of operations follows vLLM's sampler: penalties on the raw logits (repetition over prompt and
output, frequency and presence over the output), then temperature, then min_p, top_k and top_p on the
resulting distribution. temperature=0 is greedy (argmax of the penalized logits). Logprobs are reported
from the raw logits, before any penalty or filter, as vLLM does by default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

MAX_LOGPROBS = 20  # OpenAI's bound for top_logprobs


class SamplingError(ValueError):
    """A sampling parameter out of its type or range; `param` names the field for API error replies."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to generate, with vLLM's names and meanings.

    Differences from vLLM's defaults: temperature defaults to 0 (greedy: kiln's tests compare exact
    tokens) and max_tokens to 32. top_k of 0 or -1 disables it (vLLM accepted -1, newer versions 0).
    `stop` strings end generation and are not part of the text; `stop_token_ids` (and EOS unless
    `ignore_eos`) end it too and are not in the text. `n` completions per prompt are seeded seed, seed+1,
    ... when a seed is given. `logprobs=N` reports each token's logprob and the top N (0: the token
    alone). `json_schema` (a dict or JSON text) or `json_object=True` constrain the output to JSON.
    """

    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    json_schema: dict | str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        # vLLM takes one stop string or a list; store a tuple so the params stay a value
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Refuse wrong types (a bool is not a number, a float top_k is not an int), non-finite values
        and values out of range, naming the field and what it accepts."""
        _int("max_tokens", self.max_tokens, lo=1)
        _int("n", self.n, lo=1, hi=128)
        _num("temperature", self.temperature, lo=0.0, rule=">= 0 (0 is greedy)")
        _num("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True, rule="in (0, 1]")
        _int("top_k", self.top_k, lo=-1, rule="-1, 0 (both disable it) or a positive count")
        _num("min_p", self.min_p, lo=0.0, hi=1.0, rule="in [0, 1]")
        _num("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True, rule="> 0 (1 disables it)")
        _num("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0, rule="in [-2, 2]")
        _num("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0, rule="in [-2, 2]")
        if self.seed is not None:
            _int("seed", self.seed, rule="an integer or None")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError("ignore_eos", f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop", f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, tuple):
            raise SamplingError("stop_token_ids", "stop_token_ids must be a list of token ids")
        for t in self.stop_token_ids:
            _int("stop_token_ids", t, lo=0, rule="token ids >= 0")
        if not isinstance(self.json_object, bool):
            raise SamplingError("json_object", f"json_object must be true or false, got {self.json_object!r}")
        if self.json_schema is not None:
            if self.json_object:
                raise SamplingError("json_schema", "give json_schema or json_object, not both")
            schema = self.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise SamplingError("json_schema", f"json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise SamplingError("json_schema", "json_schema must be a JSON object (a dict)")


def _int(name: str, v: object, lo: int | None = None, hi: int | None = None, rule: str | None = None) -> None:
    rule = rule or (f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}")
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise SamplingError(name, f"{name} must be {rule}, got {type(v).__name__} {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise SamplingError(name, f"{name} must be {rule}, got {v}")


def _num(name: str, v: object, lo: float, hi: float | None = None, lo_open: bool = False, rule: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        raise SamplingError(name, f"{name} must be a number {rule}, got {type(v).__name__} {v!r}")
    x = float(v)
    # NaN compares False with everything, so range checks alone would let it through
    if not math.isfinite(x) or x < lo or (lo_open and x == lo) or (hi is not None and x > hi):
        raise SamplingError(name, f"{name} must be {rule}, got {v!r}")


def apply_penalties(
    logits: np.ndarray, p: SamplingParams, prompt_ids: Sequence[int] = (), output_ids: Sequence[int] = ()
) -> np.ndarray:
    """logits [vocab] -> penalized float64 copy (vLLM's rules).

    repetition_penalty: every token seen in the prompt or the output has a positive logit divided by it,
    a negative one multiplied. frequency_penalty subtracts penalty x count in the output;
    presence_penalty subtracts the penalty once for any token in the output."""
    z = np.asarray(logits, dtype=np.float64).copy()
    if not p.penalized:
        return z
    vocab = z.shape[-1]
    out = np.asarray([t for t in output_ids if 0 <= t < vocab], dtype=np.int64)
    if p.repetition_penalty != 1.0:
        seen = np.zeros(vocab, dtype=bool)
        seen[[t for t in prompt_ids if 0 <= t < vocab]] = True
        seen[out] = True
        z[seen] = np.where(z[seen] > 0, z[seen] / p.repetition_penalty, z[seen] * p.repetition_penalty)
    if p.frequency_penalty or p.presence_penalty:
        counts = np.bincount(out, minlength=vocab).astype(np.float64)
        z -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return z


def probs(
    logits: np.ndarray, p: SamplingParams, prompt_ids: Sequence[int] = (), output_ids: Sequence[int] = ()
) -> np.ndarray:
    """The distribution `sample` draws from (float64 [vocab]); one-hot argmax for greedy."""
    z = apply_penalties(logits, p, prompt_ids, output_ids)
    if p.temperature == 0:
        out = np.zeros(z.shape[-1])
        out[int(np.argmax(z))] = 1.0
        return out
    z = z / p.temperature
    z = z - z.max()
    pr = np.exp(z)
    pr /= pr.sum()
    if p.min_p > 0:  # drop tokens less likely than min_p times the most likely one
        pr = np.where(pr < p.min_p * pr.max(), 0.0, pr)
    if p.top_k > 0 and p.top_k < pr.shape[0]:
        kth = np.partition(pr, -p.top_k)[-p.top_k]
        pr = np.where(pr < kth, 0.0, pr)
    pr /= pr.sum()
    if p.top_p < 1.0:
        order = np.argsort(-pr, kind="stable")
        cum = np.cumsum(pr[order])
        keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
        mask = np.zeros_like(pr)
        mask[keep] = pr[keep]
        pr = mask / mask.sum()
    return pr


def sample(
    logits: np.ndarray,
    p: SamplingParams,
    rng: np.random.Generator,
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
) -> int:
    """logits: [vocab] float32 -> token id. Penalties need the prompt and the tokens generated so far."""
    if p.temperature == 0:
        return int(np.argmax(apply_penalties(logits, p, prompt_ids, output_ids) if p.penalized else logits))
    pr = probs(logits, p, prompt_ids, output_ids)
    return int(rng.choice(pr.shape[0], p=pr))


def logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's logprob and the `top` most likely (id, logprob), from the raw logits."""
    z = np.asarray(logits, dtype=np.float64)
    lse = z.max() + np.log(np.exp(z - z.max()).sum())
    lp = z - lse
    best: list[tuple[int, float]] = []
    if top > 0:
        idx = np.argpartition(-lp, min(top, lp.shape[0] - 1))[:top]
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        best = [(int(i), float(lp[i])) for i in idx]
    return float(lp[token]), best


def per_sequence(p: SamplingParams) -> list[SamplingParams]:
    """`n` completions -> n single-sequence params, seeded seed, seed+1, ... so that seeded samples
    differ from each other and repeat from run to run (unseeded ones draw fresh entropy each)."""
    if p.n == 1:
        return [p]
    return [replace(p, n=1, seed=None if p.seed is None else p.seed + i) for i in range(p.n)]
