"""Weights for a cuda artifact built without them (`pack_weights=False`), made on the GPU from a torch model.

This is how a large model is deployed without moving its checkpoint through the build host: the
artifact carries the program and the list of weight fields; here each field is produced from the
model's tensors in the layout the kernels read (see targets/cuda_kernels.py), on the GPU.
Needs torch (and kiln's quantizer for quantized fields).
"""
from __future__ import annotations

import re
from typing import Any

_DERIVED = re.compile(r"^(?P<base>.+)\.(?P<scheme>int\d+[^.]*)\.(?P<part>codes|scales|zeros)$")


def pack_codes_torch(codes, bits: int):
    """uint8 codes [N, Kp] -> uint8 (int8) or int32 words holding 8 int4 codes (column 8i+j at bits 4j)."""
    import torch
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    n, k = codes.shape
    c = codes.to(torch.int32).reshape(n, k // 8, 8)
    words = torch.zeros(n, k // 8, dtype=torch.int32, device=codes.device)
    for j in range(8):
        words |= (c[..., j] & 15) << (4 * j)
    return words.contiguous()


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
        self._quant: dict[tuple[str, str], tuple] = {}
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
        import torch
        t = spec["transform"]
        srcs = [self.source(s) for s in spec["sources"]]
        if t == "raw":
            return srcs[0].to(getattr(torch, spec["dtype"])).contiguous()
        if t == "cuda_f16":
            return (srcs[0] if len(srcs) == 1 else torch.cat(srcs, 0)).to(torch.float16).contiguous()
        if not t.startswith("cuda_q"):
            raise ValueError(f"weight transform '{t}' is not a cuda layout")
        head, i = t[len("cuda_"):].split(":")
        bits, rest = head[1:].split("g")
        bits, group = int(bits), int(rest[:-1])  # a symmetric scheme has no field 2
        n = len(srcs) // 3
        codes, scales, zeros = (torch.cat(srcs[j * n:(j + 1) * n], 0) for j in range(3))
        pad = -codes.shape[1] % group
        if pad:
            codes = torch.cat([codes, zeros[:, -1:].round().to(codes.dtype).expand(-1, pad)], 1)
        i = int(i)
        if i == 0:
            return pack_codes_torch(codes, bits)
        if i == 1:
            return scales.to(torch.float16).contiguous()
        return (-zeros * scales).to(torch.float16).contiguous()

    def all(self, manifest: dict) -> dict[str, Any]:
        out = {}
        for spec in manifest["weights"]:
            out[spec["name"]] = self.field(spec)
        self._quant.clear()  # codes/scales/zeros are packed now
        return out
