"""Capturing state-space mixers: the model's scan and causal convolution become one op each in the trace.

Why a substitution and not a recognizer: transformers' CPU path of a Mamba mixer runs the scan as a
Python loop over the sequence (`for index in range(seq_len)`), so `torch.export` with a symbolic
`tokens` fails ("Constraints violated") before any graph exists to recognize; Mamba-2's chunked form
exports only through padding to whole chunks, which no incremental program can use either. What the
model's code does have is a seam: the mixers call the scan and the convolution through module-level
functions (`mamba_selective_scan`, `mamba2_chunk_scan`, `causal_conv1d_fn`: the names transformers
swaps for hub kernels). While tracing, `substitute_mixers` points those names at wrappers that call
torch.library custom ops (`kiln::selective_scan`, `kiln::causal_conv1d`, with fake implementations for
export); the converter turns each into the kiln op of the same name. Everything around them (the
projections, norms, gates, embeddings, LM head) is traced from the model's own code as usual, so
`quantize-weights` and the other passes see ordinary `linear` layers. Calls the ops cannot express (an
initial state, a returned final state, an activation other than SiLU) go to the model's own function.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .ops.ssm import causal_conv1d_reference, selective_scan_reference


@torch.library.custom_op("kiln::selective_scan", mutates_args=())
def selective_scan_op(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    z: torch.Tensor | None,
    softplus: bool,
    dt_min: float,
    dt_max: float,
) -> torch.Tensor:
    """kiln's `selective_scan` (compiler/ops/ssm.py) as one op torch.export keeps whole."""
    attrs = {"softplus": softplus, "dt_min": dt_min, "dt_max": dt_max}
    return selective_scan_reference(x, dt, A, B, C, D=D, dt_bias=dt_bias, z=z, attrs=attrs).contiguous()


@selective_scan_op.register_fake
def _(x, dt, A, B, C, D, dt_bias, z, softplus, dt_min, dt_max):
    return torch.empty_like(x)


@torch.library.custom_op("kiln::causal_conv1d", mutates_args=())
def causal_conv1d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """kiln's `causal_conv1d` (x [B, T, Ch]) as one op torch.export keeps whole."""
    return causal_conv1d_reference(x, weight, bias, act).contiguous()


@causal_conv1d_op.register_fake
def _(x, weight, bias, act):
    return torch.empty_like(x)


# -- the model's functions, and what stands in for them while tracing --------------------------------


def _mamba1_scan(orig: Callable) -> Callable:
    """transformers' `mamba_selective_scan`: channels first (x, dt, z [B, D, T]; B, C [B, N, T]; A [D, N])."""

    def scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kw):
        if kw.get("return_last_state"):
            return orig(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, **kw)
        x = hidden_states.transpose(1, 2).unsqueeze(-1)  # [B, T, D, 1]: one channel per head
        zz = None if z is None else z.transpose(1, 2).unsqueeze(-1)
        Bt, Ct = B.transpose(1, 2).unsqueeze(2), C.transpose(1, 2).unsqueeze(2)  # [B, T, 1, N]
        y = selective_scan_op(x, dt.transpose(1, 2), A, Bt, Ct, D, delta_bias, zz, bool(delta_softplus), 0.0, 0.0)
        return y.squeeze(-1).transpose(1, 2)

    return scan


def _mamba2_scan(orig: Callable) -> Callable:
    """transformers' `mamba2_chunk_scan`: x [B, T, H, P], dt [B, T, H], A [H], B, C [B, T, G, N]."""

    def scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None, **kw):
        lo, hi = kw.get("dt_limit", (0.0, float("inf")))
        if initial_states is not None or kw.get("return_final_states") or kw.get("z") is not None:
            return orig(hidden_states, dt, A, B, C, chunk_size, D, dt_bias, initial_states, **kw)
        hi = 0.0 if math.isinf(hi) else float(hi)
        return selective_scan_op(
            hidden_states, dt, A, B, C, D, dt_bias, None, bool(kw.get("dt_softplus", False)), float(lo), hi
        )

    return scan


def _conv(orig: Callable) -> Callable:
    """transformers' `causal_conv1d_fn`: x [B, Ch, T], weight [Ch, W]."""

    def conv(hidden_states, weight, bias=None, activation=None, **kw):
        if activation not in (None, "silu", "swish") or kw.get("seq_idx") is not None:
            return orig(hidden_states, weight, bias, activation, **kw)
        act = "silu" if activation else ""
        y = causal_conv1d_op(hidden_states.transpose(1, 2), weight, bias, act).to(hidden_states.dtype)
        return y.transpose(1, 2)

    return conv


# module-level function name in a transformers model file -> the stand-in made from the original
SUBSTITUTES: dict[str, Callable[[Callable], Callable]] = {
    "mamba_selective_scan": _mamba1_scan,
    "mamba2_chunk_scan": _mamba2_scan,
    "causal_conv1d_fn": _conv,
}


@contextlib.contextmanager
def substitute_mixers(model: torch.nn.Module) -> Iterator[list[str]]:
    """While tracing, the scan and convolution functions of the model's own modules call kiln's ops.
    Yields the `module.name`s substituted; the model's modules are restored after."""
    saved: list[tuple[dict[str, Any], str, Any]] = []
    seen: set[str] = set()
    for m in model.modules():
        mod = type(m).__module__
        if mod in seen or mod not in sys.modules:
            continue
        seen.add(mod)
        g = vars(sys.modules[mod])
        for name, make in SUBSTITUTES.items():
            if callable(g.get(name)):
                saved.append((g, name, g[name]))
                g[name] = make(g[name])
    try:
        yield [f"{g['__name__']}.{name}" for g, name, _ in saved]
    finally:
        for g, name, orig in saved:
            g[name] = orig
