"""Calibration and evaluation text, activation statistics, perplexity and KL on the IR.

Both run the reference interpreter on the full-sequence program (before `kv-cache`), window by window.
Calibration and evaluation text are kept apart: by default calibration reads the Lee corpus's
`lee.cor` and evaluation a fixed prefix of `lee_background.cor` (see `default_texts`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field

import torch

from . import interp
from .errors import KilnError
from .ir import Graph, Node
from .log import get, step

log = get("calib")


def lee_corpus(name: str) -> str:
    """Text of a Lee corpus file shipped in the gensim wheel (`lee.cor` or `lee_background.cor`)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise KilnError("the Lee corpus ships with gensim: `pip install --no-deps gensim==4.4.0`")
    path = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data", name)
    with open(path, encoding="latin-1") as f:
        return f.read()


def read_text(spec: str) -> str:
    """'lee', 'lee_background' (built-in corpora) or a path to a text file."""
    if spec in ("lee", "lee.cor"):
        return lee_corpus("lee.cor")
    if spec in ("lee_background", "lee_background.cor"):
        return lee_corpus("lee_background.cor")
    if not os.path.exists(spec):
        raise KilnError(f"text file {spec} does not exist")
    with open(spec, encoding="utf-8", errors="replace") as f:
        return f.read()


def windows(ids: list[int], length: int, count: int) -> list[list[int]]:
    """Non-overlapping windows of `length` tokens from the start of `ids`."""
    out = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:count]
    if not out:
        raise KilnError(f"need at least {length} tokens of text, got {len(ids)}")
    return out


def _check_full_sequence(g: Graph, who: str) -> None:
    if g.find("cached_attention") or any(n.name == "positions" for n in g.inputs):
        raise KilnError(f"{who} runs on the full-sequence program: place it before kv-cache in the pipeline")


def forward(g: Graph, window: list[int], observe=None) -> torch.Tensor:
    """Logits [T, vocab] of the full-sequence graph for one window."""
    return interp.run(g, {"input_ids": torch.tensor([window])}, observe=observe)[0][0]


@dataclass
class InputStats:
    """Statistics of one node's values (a linear layer's input): X^T X, mean |x|, sampled rows."""

    k: int
    H: torch.Tensor | None = None
    absmean: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    rows: list = field(default_factory=list)
    n: int = 0

    def add(self, x: torch.Tensor, keep_rows: int) -> None:
        x = x.reshape(-1, self.k).float()
        if self.H is None or self.absmean is None or self.absmax is None:  # the first values start all three
            self.H = torch.zeros(self.k, self.k, dtype=torch.float64)
            self.absmean = torch.zeros(self.k, dtype=torch.float64)
            self.absmax = torch.zeros(self.k)
        self.H += (x.T @ x).double()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.absmean += x.abs().sum(0).double()
        self.n += x.shape[0]
        have = sum(r.shape[0] for r in self.rows)
        if have < keep_rows:
            step = max(1, x.shape[0] // max(1, (keep_rows - have)))
            self.rows.append(x[::step][: keep_rows - have].clone())

    @property
    def hessian(self) -> torch.Tensor:
        assert self.H is not None, "no values were observed"
        return (2 * self.H / max(self.n, 1)).float()

    @property
    def mean_abs(self) -> torch.Tensor:
        assert self.absmean is not None, "no values were observed"
        return (self.absmean / max(self.n, 1)).float()

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0, self.k)


def collect_input_stats(
    g: Graph, nodes: list[Node], tokens: list[list[int]], keep_rows: int = 256
) -> dict[Node, InputStats]:
    """Run calibration windows and gather statistics of the given nodes' values."""
    _check_full_sequence(g, "calibration")
    want = set(nodes)
    stats = {n: InputStats(int(n.type.shape[-1])) for n in nodes}

    def observe(node, value):
        if node in want:
            stats[node].add(value, keep_rows)

    for i, w in enumerate(tokens, 1):
        forward(g, w, observe)
        step(log, "calibration window", i, len(tokens))
    return stats


def perplexity_and_kl(
    g: Graph, tokens: list[list[int]], ref_logprobs: list[torch.Tensor] | None = None
) -> tuple[float, float | None, list[torch.Tensor]]:
    """Perplexity of next-token prediction over the windows, mean KL(ref || g) per token when reference
    log-probabilities are given, and this graph's log-probabilities (to serve as a later reference)."""
    _check_full_sequence(g, "evaluation")
    nll, count, kl, logps = 0.0, 0, 0.0, []
    for i, w in enumerate(tokens):
        logp = torch.log_softmax(forward(g, w).double(), -1)
        target = torch.tensor(w[1:])
        nll -= float(logp[:-1].gather(1, target[:, None]).sum())
        count += len(w) - 1
        if ref_logprobs is not None:
            r = ref_logprobs[i]
            kl += float((r.exp() * (r - logp)).sum())
        logps.append(logp.float())
        step(log, "evaluation window", i + 1, len(tokens))
    return math.exp(nll / count), (kl / sum(len(w) for w in tokens) if ref_logprobs is not None else None), logps
