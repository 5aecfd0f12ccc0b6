"""Knowledge distillation on the IR: train a (pruned, sparsified, converted) student graph to match a
teacher's soft labels, in PyTorch on the CPU, through the reference interpreter with autograd.

The loss is the temperature-scaled KL divergence of Hinton et al. (2015), KL(teacher_T || student_T) * T²
per token, optionally plus a hidden-state term: the mean squared error between the inputs of the two
output layers (the final normalized hidden state), divided by the teacher's mean square so the weight
does not depend on the model's scale. Both graphs are full-sequence programs (`input_ids -> logits`,
before `kv-cache`).

What is trained: the float weights of linear layers (and their biases), gated MLPs, embedding tables
and norms. Quantized weights (`qweight` codes, scales and zero points) and buffers such as rotary
frequencies stay frozen. A parameter recorded as sparse in `graph.meta["sparsity"]` keeps its zeros:
its gradient and its value are masked after every step, so a 2:4 or unstructured pattern survives.
"""

from __future__ import annotations

import math
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import interp
from .errors import KilnError
from .ir import Graph, Node
from .log import get, step

log = get("distill")

# ops whose parameter inputs are trainable weights (by input name)
_TRAINABLE_INPUTS = {
    "linear": ("w", "bias"),
    "gated_mlp": ("w_gate", "w_up", "w_down"),
    "embedding": ("w",),
    "rms_norm": ("weight",),
    "layer_norm": ("weight", "bias"),
}


@dataclass
class DistillResult:
    """The trained student and what training did. `student` is a new graph; the one passed in is untouched."""

    student: Graph
    steps: int
    loss_before: float  # distillation loss on a fixed probe batch, before and after training
    loss_after: float
    ppl_before: float | None  # perplexity on eval_tokens (when given)
    ppl_after: float | None
    teacher_ppl: float | None
    seconds: float
    history: list[float] = field(default_factory=list)  # training loss of every step
    trained_params: int = 0
    frozen_quantized: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("student")
        return d


def trainable_params(g: Graph) -> tuple[list[str], int]:
    """Names of the float parameters distillation trains, and how many quantized tensors stay frozen."""
    names: list[str] = []
    frozen: set[str] = set()
    for n in g.nodes:
        if n.op == "qweight":
            frozen.update(i.attrs["name"] for i in n.inputs if i.op == "param")
        for k in _TRAINABLE_INPUTS.get(n.op, ()):
            p = n.input(k)
            if p is not None and p.op == "param":
                name = p.attrs["name"]
                if name not in names and g.params[name].is_floating_point():
                    names.append(name)
    return [n for n in names if n not in frozen], len(frozen)


def _shared_params(g: Graph) -> set[str]:
    """The parameters of the embedding, the output layer and the norm before it."""
    out: set[str] = set()
    head = g.outputs[0]
    nodes = [n for n in g.nodes if n.op == "embedding"] + [head]
    h = _hidden_node(g)
    if h is not None:
        nodes.append(h)
    for n in nodes:
        out.update(i.attrs["name"] for i in n.inputs if i.op == "param")
    return out


def _token_ids(text: Any, g: Graph) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).long()
    if isinstance(text, (list, tuple)):
        flat = [t for w in text for t in w] if text and isinstance(text[0], (list, tuple)) else list(text)
        return torch.tensor(flat, dtype=torch.long)
    if isinstance(text, str):
        folder = g.meta.get("tokenizer_dir")
        if not folder:
            raise KilnError(
                "kiln.distill got text but the student graph names no tokenizer: pass token ids "
                "(tokenizer(text)['input_ids']), or set student.meta['tokenizer_dir'] to the model's folder"
            )
        from transformers import AutoTokenizer

        from .calib import read_text

        return torch.tensor(
            AutoTokenizer.from_pretrained(folder)(
                read_text(text) if text in ("lee", "lee.cor", "lee_background", "lee_background.cor") else text
            )["input_ids"],
            dtype=torch.long,
        )
    raise KilnError(f"kiln.distill: text must be a str, a list of token ids or a tensor, got {type(text).__name__}")


def _check_graph(g: Any, who: str) -> None:
    if not isinstance(g, Graph):
        raise KilnError(f"kiln.distill: the {who} must be a kiln Graph (kiln.trace(model)), got {type(g).__name__}")
    if g.find("cached_attention") or any(n.name == "positions" for n in g.inputs):
        raise KilnError(
            f"kiln.distill: the {who} is the KV-cached program; distill the full-sequence graph "
            "(before the kv-cache pass)"
        )


def _hidden_node(g: Graph) -> Node | None:
    """The input of the output layer (the final normalized hidden state)."""
    o = g.outputs[0]
    return o.inputs[0] if o.op == "linear" else None


def _forward(
    model: Any, ids: torch.Tensor, params: dict | None = None, grad: bool = False, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [B, T, V] (and the final hidden state when asked) of a Graph or an nn.Module."""
    if isinstance(model, Graph):
        want = _hidden_node(model) if hidden else None
        seen: dict[str, torch.Tensor] = {}

        def observe(node, value):
            if node is want:
                seen["h"] = value

        out = interp.run(
            model, {"input_ids": ids}, params=params, grad=grad, observe=observe if want is not None else None
        )[0]
        return out, seen.get("h")
    with torch.set_grad_enabled(grad):
        r = model(input_ids=ids, output_hidden_states=hidden) if hidden else model(input_ids=ids)
    logits = r.logits if hasattr(r, "logits") else (r[0] if isinstance(r, (tuple, list)) else r)
    return logits, (r.hidden_states[-1] if hidden else None)


def _loss(t_logits, s_logits, t_hidden, s_hidden, temperature: float, hidden_weight: float) -> torch.Tensor:
    T = float(temperature)
    t = torch.log_softmax(t_logits.float() / T, -1)
    s = torch.log_softmax(s_logits.float() / T, -1)
    kl = (t.exp() * (t - s)).sum(-1).mean() * T * T
    if hidden_weight and t_hidden is not None and s_hidden is not None:
        kl = kl + hidden_weight * ((s_hidden - t_hidden) ** 2).mean() / (t_hidden**2).mean().clamp_min(1e-8)
    return kl


def _perplexity(model: Any, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        logits, _ = _forward(model, torch.tensor([w]))
        logp = torch.log_softmax(logits[0].double(), -1)
        nll -= float(logp[:-1].gather(1, torch.tensor(w[1:])[:, None]).sum())
        count += len(w) - 1
    return math.exp(nll / count)


def _eval_windows(eval_tokens: Any, seq_len: int) -> list[list[int]] | None:
    if eval_tokens is None:
        return None
    if isinstance(eval_tokens, (list, tuple)) and eval_tokens and isinstance(eval_tokens[0], (list, tuple)):
        return [list(map(int, w)) for w in eval_tokens]
    flat = [
        int(t) for t in (eval_tokens.reshape(-1).tolist() if isinstance(eval_tokens, torch.Tensor) else eval_tokens)
    ]
    length = min(256, len(flat))
    return [flat[i : i + length] for i in range(0, len(flat) - length + 1, length)]


def distill(
    teacher: Any,
    student: Graph,
    text: Any,
    steps: int = 50,
    *,
    seq_len: int = 128,
    batch: int = 4,
    lr: float = 1e-4,
    temperature: float = 2.0,
    hidden_weight: float = 0.0,
    seed: int = 0,
    eval_tokens: Any = None,
    frozen: str | tuple[str, ...] = (),
) -> DistillResult:
    """Train `student` on `teacher`'s soft labels for `steps` AdamW steps of `batch` windows of `seq_len`
    tokens drawn (seeded) from `text`.

    `teacher`: a kiln Graph (full-sequence program) or a causal-LM nn.Module; `student`: a kiln Graph with
    the same vocabulary. `text`: a str (needs `student.meta['tokenizer_dir']`; "lee"/"lee_background"
    name the built-in corpora), a list of token ids (or of windows), or a tensor. `eval_tokens` (windows, or a
    flat list cut into 256-token windows) gives perplexity before and after. Returns a `DistillResult`
    whose `student` is a new graph holding the trained parameters; the graph passed in is not changed.
    Quantized weights stay frozen; sparse weights keep their zeros (see the module docstring).
    `frozen`: parameter names that do not train, or "shared" for the embedding, the output layer and the
    final norm (a draft model trained this way shares them with its target).
    """
    _check_graph(student, "student")
    if isinstance(teacher, Graph):
        _check_graph(teacher, "teacher")
    elif not isinstance(teacher, torch.nn.Module):
        raise KilnError(f"kiln.distill: the teacher must be a kiln Graph or an nn.Module, got {type(teacher).__name__}")
    if int(steps) < 0 or int(seq_len) < 2 or int(batch) < 1:
        raise KilnError(
            f"kiln.distill: need steps >= 0, seq_len >= 2 and batch >= 1 (got steps={steps}, "
            f"seq_len={seq_len}, batch={batch})"
        )
    if temperature <= 0:
        raise KilnError(f"kiln.distill: temperature must be positive, got {temperature}")
    t0 = time.perf_counter()
    ids = _token_ids(text, student)
    if ids.numel() < seq_len + 1:
        raise KilnError(
            f"kiln.distill: the text has {ids.numel()} tokens, fewer than seq_len={seq_len}; give more "
            "text or a shorter seq_len"
        )
    names, n_frozen = trainable_params(student)
    keep = _shared_params(student) if frozen == "shared" else set(frozen)
    names = [n for n in names if n not in keep]
    if not names:
        raise KilnError(
            "kiln.distill: the student has no float weights to train (all quantized?); distill before "
            "quantize-weights, then quantize the trained student"
        )
    g = student.copy()
    params = dict(g.params)
    masks = {}
    for name in names:
        params[name] = g.params[name].detach().clone().float().requires_grad_(True)
        if name in g.meta.get("sparsity", {}).get("params", {}):
            masks[name] = params[name].detach() != 0
    opt = torch.optim.AdamW([params[n] for n in names], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(int(seed))
    hidden = bool(hidden_weight)
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()

    def sample() -> torch.Tensor:
        starts = torch.randint(0, ids.numel() - seq_len + 1, (batch,), generator=gen)
        return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])

    def teacher_out(x):
        with torch.no_grad():
            tl, th = _forward(teacher, x, hidden=hidden)
        return tl.detach(), (th.detach() if th is not None else None)

    probe = sample()
    probe_t = teacher_out(probe)

    def probe_loss() -> float:
        with torch.no_grad():
            sl, sh = _forward(g, probe, params=params, hidden=hidden)
            return float(_loss(probe_t[0], sl, probe_t[1], sh, temperature, hidden_weight))

    windows = _eval_windows(eval_tokens, seq_len)
    ppl_before = _perplexity(g, windows) if windows else None
    teacher_ppl = _perplexity(teacher, windows) if windows else None
    loss_before = probe_loss()
    history = []
    for _ in range(int(steps)):
        x = sample()
        tl, th = teacher_out(x)
        sl, sh = _forward(g, x, params=params, grad=True, hidden=hidden)
        loss = _loss(tl, sl, th, sh, temperature, hidden_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, m in masks.items():
            params[name].grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for name, m in masks.items():
                params[name].mul_(m)
        history.append(round(float(loss.detach()), 6))
        step(log, f"distillation (loss {history[-1]:.4f}): step", len(history), int(steps))
    for name in names:
        g.params[name] = params[name].detach().to(student.params[name].dtype).contiguous()
    loss_after = probe_loss() if steps else loss_before
    ppl_after = _perplexity(g, windows) if windows else None
    cfg = {
        "steps": int(steps),
        "seq_len": int(seq_len),
        "batch": int(batch),
        "lr": lr,
        "temperature": temperature,
        "hidden_weight": hidden_weight,
        "seed": int(seed),
        **({"frozen": frozen if isinstance(frozen, str) else sorted(frozen)} if frozen else {}),
    }
    g.meta.setdefault("distill", []).append(
        dict(cfg, loss_before=round(loss_before, 6), loss_after=round(loss_after, 6))
    )
    return DistillResult(
        g,
        int(steps),
        loss_before,
        loss_after,
        ppl_before,
        ppl_after,
        teacher_ppl,
        round(time.perf_counter() - t0, 3),
        history,
        sum(int(params[n].numel()) for n in names),
        n_frozen,
        cfg,
    )


# `kiln.distill` names both this module and the function: importing the module makes the package
# attribute the module, so the module itself is callable and forwards to `distill`.
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> DistillResult:
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
