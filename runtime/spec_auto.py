"""Choosing the draft per step: prompt lookup, a draft model, or plain decoding, whichever pays.

Prompt lookup costs nothing to propose and wins when the output copies the prompt (summaries, edits); a
draft model costs a decode step of the draft per token and wins when the output is new text the draft
predicts well (chat). `AutoSpeculator` holds both and, before every step, scores each with the policy of
spec_policy.py: expected tokens per unit of cost, where a verify of k drafts costs `costs.ratio(k)` target
decode steps and a model draft adds `k * draft_cost` (the draft's measured decode step over the target's).
Prompt lookup's acceptance per request is kept by NgramSpeculator (scored even on steps it does not run);
the draft model's is kept here per request, starting from the average of the requests before it (per
draft engine and greedy/sampled), since a draft's acceptance is a property of the draft and the text kind.
The whole batch takes one choice per step (verify needs one call); plain decoding when neither beats it
by the policy's margin, so a class of prompts the draft does not help stays at plain speed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np

from .ngram import NgramSpeculator, speculable
from .spec_policy import Acceptance, StepCosts, best_k, step_costs
from .speculative import Speculator

# draft engine -> {greedy: bool -> Acceptance over all requests}: a new request's starting estimate
_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class AutoSpeculator:
    """Prompt lookup or the draft engine `draft`, chosen per step (see the module docstring); the Server's
    speculator interface (`serves`, `step_k`, `reserve_draft`, `step`, `release`, `stats`)."""

    kind = "auto"

    def __init__(self, target, draft, k_max: int = 8) -> None:
        self.ngram = NgramSpeculator(target, k=k_max, k_max=k_max, adaptive=True)
        self.model = Speculator(target, draft, k=k_max, k_max=k_max, adaptive=False)
        self.target, self.draft, self.k_max = target, draft, k_max
        costs = self.ngram.costs
        assert costs is not None  # adaptive prompt lookup measures the target's step costs
        self.costs: StepCosts = costs
        self.draft_cost = step_costs(draft, 1).decode / self.costs.decode  # one draft token, in target steps
        self.max_context = self.model.max_context
        self._acc: dict[int, Acceptance] = {}
        self._seen = _SEEN.setdefault(draft, {})
        self.choice = "plain"
        self.counts = {"plain": 0, "ngram": 0, "model": 0}
        self.model_proposed = self.model_accepted = self.rows = self.emitted = 0

    def serves(self, params) -> bool:
        return True  # rows that cannot speculate decode plainly inside a prompt-lookup verify step

    def _model_acc(self, s) -> Acceptance:
        a = self._acc.get(id(s))
        if a is None:
            seen = self._seen.get(s.params.temperature == 0)
            a = self._acc[id(s)] = Acceptance()
            if seen is not None:  # start from what earlier requests measured (two trials' weight)
                a.successes, a.trials = 2 * seen.rate, 2.0
        return a

    def step_k(self, seqs) -> int:
        """Score both draft sources for this batch and return the draft length of the better (0: plain)."""
        room = min(self.max_context - len(s.ids) for s in seqs)
        ng_rates, ng_lengths = self.ngram.plan(seqs)
        k_ng, g_ng = best_k(ng_rates, ng_lengths, self.costs, self.k_max) if any(ng_lengths) else (0, 0.0)
        k_m, g_m = 0, 0.0
        if all(speculable(s.params) for s in seqs):
            rates = [self._model_acc(s).rate for s in seqs]
            k_m, g_m = best_k(rates, [self.k_max] * len(seqs), self.costs, self.k_max, self.draft_cost)
        if k_m and g_m > g_ng:
            self.choice, k = "model", k_m
        elif k_ng:
            self.choice, k = "ngram", k_ng
        else:
            self.choice, k = "plain", 0
        k = max(0, min(k, room))
        if k == 0:
            self.choice = "plain"
        self.counts[self.choice] += 1
        return k

    def reserve_draft(self, s, k: int) -> None:
        if self.choice == "model":
            self.model.reserve_draft(s, k)

    def release(self, s) -> None:
        self.ngram.release(s)
        self.model.release(s)
        self._acc.pop(id(s), None)

    def step(self, seqs, k: int, pick: Callable[[int, np.ndarray], list[int]] | None = None) -> list[list[int]]:
        """One verify step with the source `step_k` chose; returns each row's new tokens (1..k+1)."""
        if self.choice != "model":
            outs = self.ngram.step(seqs, k, pick)
        else:
            outs = self.model.step(seqs, k)
            for s, new in zip(seqs, outs):
                got = len(new) - 1
                self._model_acc(s).update(got, got < k)
                seen = self._seen.setdefault(s.params.temperature == 0, Acceptance(decay=0.99))
                seen.update(got, got < k)
                self.ngram.score(s, new)
            self.model_proposed += k * len(seqs)
            self.model_accepted += sum(len(n) - 1 for n in outs)
        self.rows += len(seqs)
        self.emitted += sum(len(n) for n in outs)
        return outs

    def stats(self) -> dict:
        ng = self.ngram.stats()
        proposed = (ng["spec_proposed"] or 0) + self.model_proposed
        accepted = (ng["spec_accepted"] or 0) + self.model_accepted
        return {
            "spec_kind": self.kind,
            "spec_steps": self.counts["ngram"] + self.counts["model"],
            "spec_plain_steps": self.counts["plain"],
            "spec_proposed": proposed,
            "spec_accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else None,
            "tokens_per_verify": self.emitted / self.rows if self.rows else None,
            "spec_ngram_steps": self.counts["ngram"],
            "spec_model_steps": self.counts["model"],
            "spec_model_proposed": self.model_proposed,
            "spec_model_accepted": self.model_accepted,
            "spec_draft_cost": round(self.draft_cost, 4),
            "spec_k": self.ngram.k if self.choice == "ngram" else self.model.k.k,
        }
