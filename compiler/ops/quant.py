"""Quantized values: `qweight` (a weight as integer codes, scales and zero points) and `quant_act`
(activations after a dynamic per-token int8 round trip)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir import TensorType
from .base import NoAttrs, define, no_bytes


@dataclass(frozen=True)
class QWeightAttrs:
    bits: int
    group: int  # input channels per scale and zero point
    sym: bool  # symmetric quantization (no zero-point offset of its own)
    scheme: str  # the scheme's name (int4_g128, ...), as kiln.quant.parse_scheme reads it


def _qweight_ref(ctx, x, a):
    from ..quant import dequantize

    return dequantize(x[0], x[1], x[2], a["group"])


define(
    "qweight",
    "quant",
    ("codes", "scales", "zeros"),
    QWeightAttrs,
    lambda i, a: TensorType(i[0].type.shape, "float32"),
    _qweight_ref,
    "a quantized weight: codes [N, K], scales and zero points [N, K/group]; value (q - z) * s. "
    "Targets fuse it into its consumer (no fp32 copy of the weight is materialized)",
    bytes=no_bytes,
)  # the consumer counts the packed codes it reads (base.read_bytes)


def _fake_quant_act_ref(ctx, x, a):
    # dynamic per-token symmetric int8: the value an int8 activation kernel would see
    t = x[0]
    s = t.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(t / s).clamp(-127, 127) * s


define(
    "quant_act",
    "quant",
    ("x",),
    NoAttrs,
    lambda i, a: i[0].type,
    _fake_quant_act_ref,
    "dynamic per-token int8 quantization of activations (value after dequantization)",
)
