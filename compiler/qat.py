"""Quantization-aware training: fake-quantize a PyTorch model's linear weights for fine-tuning.

model = kiln.qat.prepare(model, "int4_g128")   # linear weights pass through fake quantization
... fine-tune model as usual (straight-through gradients) ...
art = kiln.compile(model)                       # compiles with exactly the same scheme (RTN codes
                                                # of the trained weights: the forward you trained)
"""

from __future__ import annotations

import copy

import torch
from torch.nn.utils import parametrize

from .quant import WeightQuant, dequantize, params_for, parse_scheme, quantize_with

_ATTR = "_kiln_qat_scheme"


class FakeQuant(torch.nn.Module):
    """Weight -> dequantize(quantize(weight)) with a straight-through gradient (Bengio et al., 2013)."""

    def __init__(self, scheme: WeightQuant) -> None:
        super().__init__()
        self.scheme = scheme

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            s, z = params_for(w.detach().float(), self.scheme)
            wq = dequantize(
                quantize_with(w.detach().float(), s, z, self.scheme), s, z, self.scheme.group_for(w.shape[1])
            ).to(w.dtype)
        return w + (wq - w).detach()


def prepare(model: torch.nn.Module, scheme: str | WeightQuant, lm_head: bool = True) -> torch.nn.Module:
    """Insert fake quantization on every nn.Linear weight (in place; returns the model)."""
    s = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    head = getattr(model, "get_output_embeddings", lambda: None)()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and (lm_head or mod is not head):
            if head is not None and mod is head:
                # transformers' accessor (a model with an output head has one); torch's stubs type any
                # other Module attribute as Tensor | Module, so mypy does not see it as a method
                embedding = model.get_input_embeddings()  # type: ignore[operator]
                tied = mod.weight is getattr(embedding, "weight", None)
                if tied:
                    # a tied embedding would be fake-quantized too; untie so the lookup stays fp32 as compiled
                    mod.weight = torch.nn.Parameter(mod.weight.detach().clone())
            parametrize.register_parametrization(mod, "weight", FakeQuant(s))
    setattr(model, _ATTR, (s.name, "same" if lm_head else "none"))
    return model


def qat_scheme(model) -> tuple[str, str] | None:
    """(scheme name, lm_head setting) of a prepared model, or None."""
    return getattr(model, _ATTR, None)


def strip_qat(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with the fake quantization removed (the latent trained weights kept): the compiler then
    quantizes those weights with the same scheme, reproducing the trained forward exactly."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
    delattr(m, _ATTR)
    return m.eval()
