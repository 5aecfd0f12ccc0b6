"""Weight layouts of the cuda target's kernels (targets/cuda/kernels.py), packed with numpy on the build
host or with torch on the GPU host (targets/cuda/weights.py): one layout, two array back ends.

- `F16`: fp16 [N, Kp] rows (several weights concatenated along N), also an embedding's table.
- `Quant`: codes as int32 words [N, Kp * bits / 32] (int8: storage position 4i+j at bits 8j; int4: 8i+j at
  bits 4j), fp16 scales [N, Kp/group] and, asymmetric, fp16 zs = -zero * scale (value = code * s + zs).

Columns are stored lane-interleaved (`storage_columns`): the decode GEMV gives each of a warp's 32 lanes one
16-byte load of a row per tile, and the columns in that load are chosen so that the activations they
multiply are contiguous across the warp (4 per lane, 128 per warp). In natural order a lane's load holds
E = 128 / bits consecutive columns and the warp's activation loads are strided by 4E bytes: for int4 each
16-byte activation load of the warp touches 32 cache lines instead of 4. Kp is K padded with zero weights
to whole tiles (32 lanes x E columns) and whole groups; scales stay in natural group order.
This module needs no TVM: the GPU host imports it with TVM's runtime only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.targets.common.layouts import Layout, QuantKey, pad_codes, register_parser, split_sources

PREFIX = "cuda_"


def tile_cols(bits: int) -> int:
    """Columns one warp's 16-byte loads of a row cover: 32 lanes x 128 / bits weights."""
    return 32 * 128 // bits


def padded_cols(k: int, bits: int, group: int = 0) -> int:
    """K padded to whole tiles and whole groups (the padding holds zero weights; the activations are
    zero-padded to match). One group over the whole row (per-channel scales) needs whole tiles only."""
    m = math.lcm(tile_cols(bits), group) if 0 < group < k else tile_cols(bits)
    return -(-k // m) * m


def scale_group(k: int, bits: int, group: int) -> int:
    """Columns per scale in the padded row: the group, or the whole padded row for per-channel scales."""
    return group if 0 < group < k else padded_cols(k, bits, group)


def storage_columns(kp: int, bits: int) -> np.ndarray:
    """The natural column at each storage position of a row: lane tx's load of tile t holds, at slot p,
    column t*T + 128*(p // 4) + 4*tx + p % 4 (T = tile_cols(bits), kp a multiple of T)."""
    e = 128 // bits
    pos = np.arange(kp)
    t, r = np.divmod(pos, 32 * e)
    tx, p = np.divmod(r, e)
    return t * 32 * e + 128 * (p // 4) + 4 * tx + p % 4


def _pad_cols(a: Any, kp: int) -> Any:
    """[N, K] -> [N, kp], zero-filled (numpy or torch)."""
    pad = kp - a.shape[1]
    if not pad:
        return a
    if isinstance(a, np.ndarray):
        return np.concatenate([a, np.zeros((a.shape[0], pad), a.dtype)], axis=1)
    import torch

    return torch.cat([a, a.new_zeros(a.shape[0], pad)], 1)


def interleave(a: Any, bits: int, group: int = 0) -> Any:
    """A row-major weight or code array [N, K] in natural column order -> [N, Kp] in storage order."""
    kp = padded_cols(a.shape[1], bits, group)
    cols = storage_columns(kp, bits)
    a = _pad_cols(a, kp)
    if isinstance(a, np.ndarray):
        return a[:, cols]
    import torch

    return a[:, torch.from_numpy(cols).to(a.device)]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [N, Kp] -> the kernel's int32 words (int8: 4 codes per word, int4: 8)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.view(np.int32)  # little-endian: column 4i+j is byte j of word i
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
        return codes.to(torch.uint8).contiguous().view(torch.int32)
    n, k = codes.shape
    c = codes.to(torch.int32).reshape(n, k // 8, 8)
    words = torch.zeros(n, k // 8, dtype=torch.int32, device=codes.device)
    for j in range(8):
        words |= (c[..., j] & 15) << (4 * j)
    return words.contiguous()


def packed_shapes(n: int, k: int, bits: int, group: int, sym: bool) -> list[tuple[tuple[int, ...], str]]:
    """Shape and dtype of each part for a weight [n, k] (k as the model has it)."""
    kp = padded_cols(k, bits, group)
    ng = kp // scale_group(k, bits, group)
    out: list[tuple[tuple[int, ...], str]] = [
        ((n, kp * bits // 32), "int32"),
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
        return [np.ascontiguousarray(interleave(np.concatenate(arrays, axis=0).astype(np.float16), 16))]

    def pack_torch(self, tensors: list[Any]) -> list[Any]:
        import torch

        w = (tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)).to(torch.float16)
        return [interleave(w, 16).contiguous()]


@dataclass(frozen=True)
class Quant(Layout):
    bits: int = 4
    group: int = 128
    sym: bool = False

    def key(self) -> str:
        return QuantKey(self.bits, self.group, self.sym, self.part).format(PREFIX)

    def pack(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        codes, scales, zeros = split_sources(arrays)
        k = codes.shape[1]
        codes = interleave(pad_codes(codes, zeros, self.group), self.bits, self.group)
        ng = codes.shape[1] // scale_group(k, self.bits, self.group)
        out = [pack_codes(codes, self.bits), _pad_cols(scales.astype(np.float16), ng)]
        if not self.sym:
            out.append(_pad_cols((-zeros * scales).astype(np.float16), ng))
        return out

    def pack_torch(self, tensors: list[Any]) -> list[Any]:
        import torch

        codes, scales, zeros = split_sources(tensors)
        k = codes.shape[1]
        codes = interleave(pad_codes(codes, zeros, self.group), self.bits, self.group)
        ng = codes.shape[1] // scale_group(k, self.bits, self.group)
        out = [pack_codes_torch(codes, self.bits), _pad_cols(scales.to(torch.float16), ng).contiguous()]
        if not self.sym:
            out.append(_pad_cols((-zeros * scales).to(torch.float16), ng).contiguous())
        return out


@register_parser
def _parse(key: str) -> Layout | None:
    if key == PREFIX + "f16":
        return F16()
    q = QuantKey.parse(key, PREFIX)
    return None if q is None else Quant(part=q.part, bits=q.bits, group=q.group, sym=q.sym)
