"""Weights for a cuda artifact built without them (`pack_weights=False`), made on the GPU from a torch model.

This is how a large model is deployed without moving its checkpoint through the build host: the
artifact carries the program and the list of weight fields; here each field is produced from the
model's tensors in the layout the kernels read (see targets/cuda/layouts.py), on the GPU.
Needs torch (and kiln's quantizer for quantized fields).
"""

from __future__ import annotations

import re
from typing import Any

from kiln.targets.common.layouts import parse_layout

from .layouts import F16, Quant

_DERIVED = re.compile(r"^(?P<base>.+)\.(?P<scheme>int\d+[^.]*)\.(?P<part>codes|scales|zeros)$")


def tensors_of(model) -> dict[str, Any]:
    """Parameters and buffers by the names kiln's tracer gives them."""
    out = dict(model.named_buffers())
    out.update(dict(model.named_parameters(remove_duplicate=False)))
    return out


class WeightMaker:
    """Builds each manifest weight field from named torch tensors (fp16 or fp32, on one device)."""

    def __init__(self, tensors: dict[str, Any], keep_dequantized: bool = False) -> None:
        self.tensors = tensors
        self.keep_dequantized = keep_dequantized
        self._quant: dict[tuple[str, str], dict[str, Any]] = {}  # (base, scheme) -> codes, scales, zeros
        self._packed: dict[tuple, list] = {}
        self.dequantized: dict[str, Any] = {}  # base weight -> the values the quantized kernels compute with

    def source(self, name: str):
        m = _DERIVED.match(name)
        if m is None:
            if name not in self.tensors:
                raise KeyError(f"weight source '{name}' is not a parameter or buffer of the model")
            return self.tensors[name]
        key = (m["base"], m["scheme"])
        if key not in self._quant:
            from kiln.quant import parse_scheme, rtn

            scheme = parse_scheme(m["scheme"])
            w = self.tensors[m["base"]].float()
            q, s, z = rtn(w, scheme)
            self._quant[key] = {"codes": q, "scales": s, "zeros": z}
            if self.keep_dequantized:
                self._keep(m["base"], scheme, q, s, z)
        return self._quant[key][m["part"]]

    def _keep(self, base: str, scheme, q, s, z) -> None:
        """Record the values the kernels compute with: fp16 scales and fp16 zs = -z * s (value = q*s + zs)."""
        g = scheme.group_for(q.shape[1])
        s16 = s.half().float()
        zs16 = -z * s16 if scheme.sym else (-z * s).half().float()
        k = q.shape[1]
        self.dequantized[base] = q.float() * s16.repeat_interleave(g, 1)[:, :k] + zs16.repeat_interleave(g, 1)[:, :k]

    def field(self, spec: dict):
        """One manifest weight field, made on the tensors' device in the field's layout."""
        import torch

        lay = parse_layout(spec["transform"])
        srcs = [self.source(s) for s in spec["sources"]]
        if spec["transform"] in ("raw", "cat"):
            return torch.cat(srcs, 0).to(getattr(torch, spec["dtype"])).contiguous()
        if not isinstance(lay, (F16, Quant)):
            raise ValueError(f"weight transform '{spec['transform']}' is not a cuda layout")
        fam = (tuple(spec["sources"]), lay.family())
        if fam not in self._packed:  # the parts of one family are packed together, once
            self._packed = {fam: lay.pack_torch(srcs)}
        return self._packed[fam][lay.part]

    def all(self, manifest: dict) -> dict[str, Any]:
        out = {}
        for spec in manifest["weights"]:
            out[spec["name"]] = self.field(spec)
        self._quant.clear()  # codes/scales/zeros are packed now
        self._packed.clear()
        return out
