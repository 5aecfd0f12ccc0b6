"""Prompt-lookup speculation: drafts copied from earlier in the sequence, checked by the target's `verify`.

When a model summarizes a passage, edits code or answers about a text it was given, its output repeats
runs of the prompt. `propose` finds the last n tokens (n from `max_n` down to `min_n`) earlier in
prompt + output and proposes the tokens that followed there; no second model runs. The draft is a
deterministic function of the sequence so far, i.e. a draft distribution that is one-hot on the proposed
token, so the rejection rule stays exact: a sampled row accepts draft d with probability p(d) and on a
rejection samples from p with d removed (`speculative.accept`); a greedy row accepts d iff it is the argmax.

`NgramSpeculator` has the interface the Server drives (`step_k`, `reserve_draft`, `step`, `release`,
`stats`). With `adaptive=True` each request's draft length follows its acceptance and the measured
cost of verify steps (spec_policy.py). Proposals cost nothing to make, so a request that does not
speculate still scores its proposals against the tokens it produced (a sampled token equals d with
probability p(d), the same chance the rule would have accepted d), and speculation resumes when they
start to agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .sampling import SamplingParams
from .spec_policy import Acceptance, choose_k, step_costs


def propose(ids: Sequence[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `ids`
    (length max_n down to min_n); [] when no suffix occurs earlier. Among occurrences of that suffix the
    latest one followed by k tokens is preferred, else the latest one."""
    L = len(ids)
    if k < 1 or L < 2:
        return []
    a = np.asarray(ids, dtype=np.int64)  # a: [L]
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        # starts i in [0, L-n-1]: the occurrence ends before the last token, so a continuation exists
        hit = a[: L - n] == a[L - n]
        for j in range(1, n):
            hit &= a[j : L - n + j] == a[L - n + j]
        starts = np.flatnonzero(hit)
        if starts.size:
            full = starts[starts + n + k <= L]
            i = int(full[-1] if full.size else starts[-1])
            return a[i + n : i + n + k].tolist()
    return []


def speculable(p: SamplingParams) -> bool:
    """Whether a request's tokens can come from verify steps: plain temperature/top-k/top-p/min-p
    sampling. Penalties, logprobs and JSON constraints need each token picked by its Decoder."""
    return not (p.penalized or p.logprobs is not None or p.json_object or p.json_schema is not None)


class _State:
    """A request's speculation state: its acceptance, and the draft proposed at length `at` (if any)."""

    __slots__ = ("acc", "at", "draft")

    def __init__(self) -> None:
        self.acc = Acceptance()
        self.at = -1
        self.draft: list[int] = []


class NgramSpeculator:
    """Batched prompt-lookup speculation over sequences in the decode phase (see the module docstring).

    A sequence needs `ids` (prompt + generated; the target has KV for all but the last), `pages`
    (covering positions up to len(ids)-1+k) and `params`, `rng`. `k` is the draft length when not
    adaptive, `k_max` the longest one tried when adaptive."""

    kind = "ngram"

    def __init__(
        self, target, k: int = 4, k_max: int = 8, adaptive: bool = True, max_n: int = 3, min_n: int = 1
    ) -> None:
        if not 1 <= min_n <= max_n or k < 1 or k_max < 1:
            raise ValueError("ngram speculation needs 1 <= min_n <= max_n, k >= 1 and k_max >= 1")
        self.target, self.adaptive = target, adaptive
        self.k_max = k_max if adaptive else k
        self.max_n, self.min_n = max_n, min_n
        self.costs = step_costs(target, self.k_max) if adaptive else None
        self.max_context = target.max_context
        self._state: dict[int, _State] = {}
        self.k = self.k_max
        self.steps = self.plain_steps = self.proposed = self.accepted = self.rows = self.emitted = 0

    def serves(self, params: SamplingParams) -> bool:
        return True  # requests that cannot speculate decode plainly inside the same verify step

    def stats(self) -> dict:
        return {
            "spec_kind": self.kind,
            "spec_steps": self.steps,
            "spec_plain_steps": self.plain_steps,
            "spec_proposed": self.proposed,
            "spec_accepted": self.accepted,
            "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
            "tokens_per_verify": self.emitted / self.rows if self.rows else None,
            "spec_k": self.k,
        }

    def _st(self, s) -> _State:
        st = self._state.get(id(s))
        if st is None:
            st = self._state[id(s)] = _State()
        return st

    def plan(self, seqs) -> tuple[list[float], list[int]]:
        """Score last step's unverified proposals, propose afresh; returns each row's acceptance estimate
        and proposal length."""
        rates, lengths = [], []
        for s in seqs:
            st = self._st(s)
            if st.draft and st.at == len(s.ids) - 1:  # plain step since the proposal: did it agree?
                ok = s.ids[-1] == st.draft[0]
                st.acc.update(int(ok), not ok)
            st.draft = propose(s.ids, self.k_max, self.max_n, self.min_n) if speculable(s.params) else []
            st.at = len(s.ids)
            rates.append(st.acc.rate)
            lengths.append(len(st.draft))
        return rates, lengths

    def score(self, s, new: Sequence[int]) -> None:
        """Score the row's pending proposal against the tokens `new` another speculator produced for it
        this step (before they join `ids`), and drop it: a sampled token equals d with probability p(d),
        the chance the rule would have accepted d."""
        st = self._st(s)
        if st.draft and st.at == len(s.ids):
            n = min(len(st.draft), len(new))
            got = next((j for j in range(n) if st.draft[j] != new[j]), n)
            if n:
                st.acc.update(got, got < n)
        st.draft, st.at = [], -1

    def step_k(self, seqs) -> int:
        """Score last step's unverified proposals, propose afresh, and pick the step's draft length."""
        rates, lengths = self.plan(seqs)
        room = min(self.max_context - len(s.ids) for s in seqs)
        if not any(lengths):
            k = 0
        elif self.costs is None:
            k = self.k_max
        else:
            k = choose_k(rates, lengths, self.costs, self.k_max)
        k = max(0, min(k, room))
        if k == 0:
            self.plain_steps += 1
        else:
            self.k = k
        return k

    def reserve_draft(self, s, k: int) -> None:
        pass  # no draft model, no draft pages

    def release(self, s) -> None:
        self._state.pop(id(s), None)

    def step(self, seqs, k: int, pick: Callable[[int, np.ndarray], list[int]] | None = None) -> list[list[int]]:
        """Verify each row's draft (padded to k) in one target call; returns each row's new tokens (1..k+1).
        Rows that cannot speculate get `pick(row, logits)` of their first position (one token)."""
        from .speculative import accept

        if k < 1:
            raise ValueError("k must be >= 1")
        drafts = []
        for s in seqs:
            st = self._st(s)
            d = st.draft[:k] if st.at == len(s.ids) else []
            drafts.append(d + [d[-1] if d else s.ids[-1]] * (k - len(d)))  # padding: checked like any draft
        lg = self.target.verify(
            [[s.ids[-1]] + d for s, d in zip(seqs, drafts)],
            [list(range(len(s.ids) - 1, len(s.ids) + k)) for s in seqs],
            [s.pages for s in seqs],
        )  # lg: [B, k+1, vocab]
        outs = []
        for i, s in enumerate(seqs):
            st = self._st(s)
            if not speculable(s.params):
                if pick is None:
                    raise ValueError("a request that cannot speculate needs its Decoder's pick")
                outs.append(pick(i, lg[i, 0]))
                continue
            new = accept(lg[i], drafts[i], None, s.params, s.rng)
            real = min(len(st.draft), k) if st.at == len(s.ids) else 0
            got = min(len(new) - 1, real)
            if real:
                st.acc.update(got, got < real)
                self.proposed += real
                self.accepted += got
            st.draft, st.at = [], -1
            self.rows += 1
            self.emitted += len(new)
            outs.append(new)
        self.steps += 1
        return outs
