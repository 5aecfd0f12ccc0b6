"""Speculative decoding: a small draft engine proposes k tokens, the target checks them in one `verify` call.

Greedy rows accept a draft token iff it equals the target's argmax there (the output is exactly the
target's greedy output). Sampled rows use the rejection rule of Leviathan et al. 2023 / Chen et al. 2023:
accept draft token d with probability min(1, p(d)/q(d)); on the first rejection sample from
norm(max(0, p - q)); when all k are accepted sample a bonus token from the target's next distribution.
p and q are the target's and draft's distributions after the request's temperature / top-k / top-p, so the
output has exactly the distribution of sampling the target alone with those params.

The draft keeps its own KV pages in its own engine (`Speculator.draft_pages`, a PageManager). k is shared by
the rows of a step (verify needs equal lengths) and adapts to the acceptance rate (`AdaptiveK`).

Prompt lookup ("ngram", no draft model) lives in ngram.py and shares `accept`; a draft model can ship
inside the target's artifact (`kiln build --draft self:8`, `load_draft`); spec_auto.py chooses between
the two per step; `make_speculator` picks.

    spec = SpeculativeDecoder(target, draft, k=4)  # draft: an Engine or "ngram"
    out = spec.generate(prompt_ids, SamplingParams(max_tokens=64))
    spec.stats()  # proposed, accepted, acceptance_rate, k
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .draft_model import MODEL_DRAFTS, load_draft
from .kv_cache import PageManager
from .ngram import speculable
from .sampling import SamplingParams, probs, sample


def accept(
    target_logits: np.ndarray,
    draft_tokens: Sequence[int],
    draft_probs: Sequence[np.ndarray] | None,
    params: SamplingParams,
    rng: np.random.Generator,
) -> list[int]:
    """target_logits [k+1, vocab] for positions of (last token, d1..dk). Returns the accepted draft
    tokens followed by one token from the target (correction or bonus): 1..k+1 tokens.

    `draft_probs` None means the drafts were chosen deterministically from the sequence (prompt lookup):
    q is one-hot on d, so d is accepted with probability p(d) and a rejection samples p without d."""
    k = len(draft_tokens)
    out: list[int] = []
    if params.temperature == 0:
        for i in range(k):
            t = int(np.argmax(target_logits[i]))
            out.append(t)
            if t != draft_tokens[i]:
                return out
        out.append(int(np.argmax(target_logits[k])))
        return out
    for i in range(k):
        p = probs(target_logits[i], params)
        d = int(draft_tokens[i])
        if draft_probs is None:
            if rng.random() < p[d]:
                out.append(d)
                continue
            res = p.copy()
            res[d] = 0.0
        else:
            q = draft_probs[i]
            if q[d] > 0 and rng.random() < min(1.0, p[d] / q[d]):
                out.append(d)
                continue
            res = np.maximum(p - q, 0.0)
        s = res.sum()
        res = res / s if s > 0 else p
        out.append(int(rng.choice(res.shape[0], p=res)))
        return out
    out.append(int(rng.choice(target_logits.shape[-1], p=probs(target_logits[k], params))))
    return out


class AdaptiveK:
    """Grow k by one when every row accepted every draft token; shrink by one when fewer than half were."""

    def __init__(self, k: int = 4, k_min: int = 1, k_max: int = 8, adaptive: bool = True) -> None:
        self.k, self.k_min, self.k_max, self.adaptive = k, k_min, k_max, adaptive

    def update(self, k: int, accepted: Sequence[int]) -> None:
        if not self.adaptive or not accepted or k == 0:
            return
        if all(a == k for a in accepted):
            self.k = min(self.k + 1, self.k_max)
        elif sum(accepted) < 0.5 * k * len(accepted):
            self.k = max(self.k - 1, self.k_min)


class Speculator:
    """Batched speculative step over sequences that are in the decode phase.

    A sequence object needs: `ids` (prompt + generated; the target has KV for all but the last),
    `pages` (target pages covering positions up to len(ids)-1+k), `dpages` (draft pages), `dcomputed`
    (positions the draft has KV for), `params`, `rng`."""

    def __init__(self, target, draft, k: int = 4, k_max: int = 8, adaptive: bool = True) -> None:
        # a draft with a reduced output layer maps its logit j to token vocab_map[j] (kiln/draft.py)
        self.vmap = getattr(draft, "vocab_map", None)
        tv = _vocab(target)
        dv = _vocab(draft) if self.vmap is None else getattr(draft, "vocab_size", None)
        if tv is not None and dv is not None and tv != dv:
            raise ValueError(
                f"the draft's vocabulary ({dv}) differs from the target's ({tv}): a draft must share "
                "the target's tokenizer"
            )
        self.target, self.draft = target, draft
        self.draft_pages = PageManager(draft.pool, draft.kv_layout.copy_page, prefix_caching=False)
        self.k = AdaptiveK(k, 1, k_max, adaptive)
        self.k_max = k_max
        self.proposed = self.accepted = self.steps = 0
        self.max_context = min(target.max_context, draft.max_context)

    kind = "draft"

    def serves(self, params: SamplingParams) -> bool:
        """The draft samples with the request's temperature/top-k/top-p only: no penalties, logprobs, JSON."""
        return speculable(params)

    def stats(self) -> dict:
        return {
            "spec_kind": self.kind,
            "spec_steps": self.steps,
            "spec_proposed": self.proposed,
            "spec_accepted": self.accepted,
            "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
            "spec_k": self.k.k,
        }

    def step_k(self, seqs) -> int:
        """k for the next step: the adaptive k, clamped so every position fits the context."""
        room = min(self.max_context - len(s.ids) for s in seqs)
        return max(0, min(self.k.k, room))

    def reserve_draft(self, s, k: int) -> None:
        """Draft pages for positions up to len(ids)-1+k-1 (raises OutOfPages)."""
        self.draft_pages.ensure(s.dpages, len(s.ids) + k - 1)

    def release(self, s) -> None:
        self.draft_pages.release(s.dpages)
        s.dpages, s.dcomputed = [], 0

    def step(self, seqs, k: int, pick=None) -> list[list[int]]:
        """Propose k tokens per sequence and verify them; returns the new tokens of each sequence (1..k+1).
        The caller appends them to `ids` (and may truncate at a stop token). Every row must be one
        `serves` accepts (`pick` is for speculators that mix plain rows in)."""
        if k < 1:
            raise ValueError("k must be >= 1")
        B = len(seqs)
        dtoks: list[list[int]] = [[] for _ in range(B)]
        dprobs: list[list[np.ndarray]] = [[] for _ in range(B)]

        vmap = self.vmap

        def take(i: int, logits: np.ndarray) -> None:
            s = seqs[i]
            if s.params.temperature == 0:
                j = int(np.argmax(logits))
                dtoks[i].append(j if vmap is None else int(vmap[j]))
            else:
                q = probs(logits, s.params)
                j = int(s.rng.choice(q.shape[0], p=q))
                if vmap is not None:  # q over the whole vocabulary, zero outside the draft's tokens
                    full = np.zeros(self.target.vocab_size, dtype=q.dtype)
                    full[vmap] = q
                    q, j = full, int(vmap[j])
                dprobs[i].append(q)
                dtoks[i].append(j)

        # 1. draft catches up with the sequence (1 token usually; 2 after a fully accepted step; the whole
        #    prompt the first time) and proposes d1
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            groups.setdefault(len(s.ids) - s.dcomputed, []).append(i)
        for n, rows in groups.items():
            if n == 1:
                lg = self.draft.decode(
                    [seqs[i].ids[-1] for i in rows],
                    [len(seqs[i].ids) - 1 for i in rows],
                    [seqs[i].dpages for i in rows],
                )
                for i, row in zip(rows, lg):
                    take(i, row)
            elif n <= 8:
                lg = self.draft.verify(
                    [seqs[i].ids[-n:] for i in rows],
                    [list(range(len(seqs[i].ids) - n, len(seqs[i].ids))) for i in rows],
                    [seqs[i].dpages for i in rows],
                )
                for i, row in zip(rows, lg):
                    take(i, row[-1])
            else:
                for i in rows:
                    s = seqs[i]
                    take(i, self.draft.prefill(s.ids[s.dcomputed :], s.dpages, start=s.dcomputed))
        # 2. k-1 more greedy/sampled draft steps, batched
        for j in range(1, k):
            lg = self.draft.decode(
                [dtoks[i][-1] for i in range(B)], [len(s.ids) - 1 + j for s in seqs], [s.dpages for s in seqs]
            )
            for i in range(B):
                take(i, lg[i])
        # 3. target verifies (last token, d1..dk) in one call
        lg = self.target.verify(
            [[s.ids[-1]] + dtoks[i] for i, s in enumerate(seqs)],
            [list(range(len(s.ids) - 1, len(s.ids) + k)) for s in seqs],
            [s.pages for s in seqs],
        )
        outs, acc = [], []
        for i, s in enumerate(seqs):
            new = accept(lg[i], dtoks[i], dprobs[i], s.params, s.rng)
            j = len(new) - 1
            acc.append(j)
            s.dcomputed = len(s.ids) + min(j, k - 1)
            outs.append(new)
        self.steps += 1
        self.proposed += k * B
        self.accepted += sum(acc)
        self.k.update(k, acc)
        return outs


def make_speculator(target, draft, k: int = 4, k_max: int = 8, adaptive: bool = True):
    """The speculator for `draft`: a draft Engine (Speculator), "ngram" (prompt lookup, NgramSpeculator),
    "self" / "distill" (that draft model shipped in the target's artifact), or "auto" / "auto:self" /
    "auto:distill" (per step, prompt lookup or the artifact's draft model, whichever is expected to pay;
    spec_auto.py)."""
    if isinstance(draft, str):
        kind, _, which = draft.partition(":")
        if kind == "ngram" and not which:
            from .ngram import NgramSpeculator

            return NgramSpeculator(target, k=k, k_max=k_max, adaptive=adaptive)
        if kind in MODEL_DRAFTS and not which:
            return Speculator(target, load_draft(target, kind), k, k_max, adaptive)
        if kind == "auto" and which in ("",) + MODEL_DRAFTS:
            from .spec_auto import AutoSpeculator

            return AutoSpeculator(target, load_draft(target, which or None), k_max)
        raise ValueError(
            f"unknown draft {draft!r}: give a draft Engine, 'ngram' (prompt lookup), 'self' or 'distill' (a "
            "draft model built into the artifact), or 'auto' (prompt lookup or the draft model, per step)"
        )
    return Speculator(target, draft, k, k_max, adaptive)


def _vocab(engine) -> int | None:
    try:
        for o in engine.manifest["entry_points"]["decode"]["outputs"]:
            return int(str(o["type"]).rstrip("]").split(",")[-1])
    except Exception:
        return None
    return None


@dataclass
class _S:
    ids: list[int]
    pages: list[int]
    params: SamplingParams
    rng: np.random.Generator
    dpages: list[int] = field(default_factory=list)
    dcomputed: int = 0


class SpeculativeDecoder:
    """Single-stream speculative generation (the Server batches the same step over many requests)."""

    def __init__(self, target, draft, k: int = 4, k_max: int = 8, adaptive: bool = True) -> None:
        self.spec = make_speculator(target, draft, k, k_max, adaptive)
        self.target = target

    def stats(self) -> dict:
        return self.spec.stats()

    def generate(self, prompt, params: SamplingParams = SamplingParams()):
        from .engine import Completion

        eng = self.target
        ids = eng.encode(prompt)
        params.validate()
        if not speculable(params):
            raise ValueError(
                "SpeculativeDecoder samples without penalties, logprobs or JSON constraints: use "
                "Server(engine, draft=...) or Engine.generate for those requests"
            )
        eng._check(ids, params, 0)
        kmax = self.spec.k_max
        pages = eng.pool.alloc(eng.pool.pages_for(min(len(ids) + params.max_tokens + kmax, eng.max_context)))
        s = _S(list(ids), pages, params, np.random.default_rng(params.seed))
        out = Completion(list(ids))
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eng.eos_ids))
        try:
            t0 = time.perf_counter()
            s.ids.append(sample(eng.prefill(ids, pages), params, s.rng))
            out.prefill_seconds = time.perf_counter() - t0
            while s.ids[-1] not in stops and len(s.ids) - len(ids) < params.max_tokens:
                k = min(self.spec.step_k([s]), params.max_tokens - (len(s.ids) - len(ids)))
                if k < 1:
                    s.ids.append(sample(eng.decode([s.ids[-1]], [len(s.ids) - 1], [pages])[0], params, s.rng))
                    continue
                self.spec.reserve_draft(s, k)
                for t in self.spec.step([s], k)[0]:
                    s.ids.append(t)
                    if t in stops or len(s.ids) - len(ids) >= params.max_tokens:
                        break
        finally:
            eng.pool.release(pages)
            self.spec.release(s)
        out.token_ids = s.ids[len(ids) :]
        out.finish_reason = "stop" if out.token_ids[-1] in stops else "length"
        if eng.tokenizer is not None:
            out.text = eng.tokenizer.decode(out.token_ids)
        return out
