"""Weight layouts of the cuda target's kernels (targets/cuda/kernels.py), packed with numpy on the build
host or with torch on the GPU host (targets/cuda/weights.py): one layout, two array back ends.

- `F16`: fp16 [N, K] rows (several weights concatenated along N), also an embedding's table.
- `Quant`: codes [N, Kp] (int8: one byte each; int4: 8 codes per int32 word, column 8i+j at bits 4j),
  fp16 scales [N, Kp/group] and, asymmetric, fp16 zs = -zero * scale (value = code * s + zs).
This module needs no TVM: the GPU host imports it with TVM's runtime only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.targets.common.layouts import Layout, QuantKey, pad_codes, register_parser, split_sources

PREFIX = "cuda_"


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [N, Kp] -> the kernel's code array (int4: 8 codes per int32 word)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    n, k = codes.shape
    c = codes.reshape(n, k // 8, 8).astype(np.uint32)
    words = np.zeros((n, k // 8), dtype=np.uint32)
    for j in range(8):
        words |= (c[..., j] & 15) << (4 * j)
    return words.view(np.int32)


def pack_codes_torch(codes: Any, bits: int) -> Any:
    """`pack_codes` for a torch tensor on any device (the same words)."""
    import torch

    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    n, k = codes.shape
    c = codes.to(torch.int32).reshape(n, k // 8, 8)
    words = torch.zeros(n, k // 8, dtype=torch.int32, device=codes.device)
    for j in range(8):
        words |= (c[..., j] & 15) << (4 * j)
    return words.contiguous()


def packed_shapes(n: int, k: int, bits: int, group: int, sym: bool) -> list[tuple[tuple[int, ...], str]]:
    """Shape and dtype of each part for a weight [n, k] (k already padded to whole groups)."""
    g = group or k
    ng = (k + g - 1) // g
    out: list[tuple[tuple[int, ...], str]] = [
        ((n, k if bits == 8 else k // 8), "uint8" if bits == 8 else "int32"),
        ((n, ng), "float16"),
    ]
    if not sym:
        out.append(((n, ng), "float16"))
    return out


@dataclass(frozen=True)
class F16(Layout):
    def key(self) -> str:
        return PREFIX + "f16"

    def pack(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(np.concatenate(arrays, axis=0).astype(np.float16))]

    def pack_torch(self, tensors: list[Any]) -> list[Any]:
        import torch

        return [(tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)).to(torch.float16).contiguous()]


@dataclass(frozen=True)
class Quant(Layout):
    bits: int = 4
    group: int = 128
    sym: bool = False

    def key(self) -> str:
        return QuantKey(self.bits, self.group, self.sym, self.part).format(PREFIX)

    def pack(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        codes, scales, zeros = split_sources(arrays)
        codes = pad_codes(codes, zeros, self.group)
        out = [pack_codes(codes, self.bits), scales.astype(np.float16)]
        if not self.sym:
            out.append((-zeros * scales).astype(np.float16))
        return out

    def pack_torch(self, tensors: list[Any]) -> list[Any]:
        import torch

        codes, scales, zeros = split_sources(tensors)
        codes = pad_codes(codes, zeros, self.group)
        out = [pack_codes_torch(codes, self.bits), scales.to(torch.float16).contiguous()]
        if not self.sym:
            out.append((-zeros * scales).to(torch.float16).contiguous())
        return out


@register_parser
def _parse(key: str) -> Layout | None:
    if key == PREFIX + "f16":
        return F16()
    q = QuantKey.parse(key, PREFIX)
    return None if q is None else Quant(part=q.part, bits=q.bits, group=q.group, sym=q.sym)
