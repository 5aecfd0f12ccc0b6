"""Weight layouts of the cuda target's kernels (targets/cuda/kernels.py), packed with numpy on the build
host or with torch on the GPU host (targets/cuda/weights.py): one layout, two array back ends.

- `F16`: fp16 [N, Kp] rows (several weights concatenated along N), also an embedding's table.
- `Quant`: codes in the order of the tensor-core GEMV's `mma` A fragments (targets/cuda/qgemv.py): int32
  words [Np / 16, Kp * bits / 2] (Np = N padded to row tiles of 16), fp16 scales [Np, Kp/group] and,
  asymmetric, fp16 zs = -zero * scale (value = code * s + zs). `code_index` says where a code lives.

fp16 columns are stored lane-interleaved (`storage_columns`): the fp16 decode GEMV gives each of a warp's 32
lanes one 16-byte load of a row per tile, and the columns in that load are chosen so that the activations
they multiply are contiguous across the warp (4 per lane, 128 per warp). In natural order a lane's load
holds 8 consecutive columns and the warp's activation loads would be strided by 32 bytes. Kp is K padded
with zero weights to whole tiles (fp16: 32 lanes x 8 columns; int4: 64 columns, int8: 32, one lane's
16-byte load) and whole groups; scales stay in natural group order.
This module needs no TVM: the GPU host imports it with TVM's runtime only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.targets.common.layouts import Layout, QuantKey, pad_codes, register_parser, split_sources

PREFIX = "cuda_"
QPREFIX = "cuda_mma_"  # quantized codes in `mma` fragment order (the lane-interleaved "cuda_q..." order is gone)


def tile_cols(bits: int) -> int:
    """Columns K is padded to a multiple of: one warp's 16-byte loads of an fp16 row (32 lanes x 8), one
    lane's 16-byte load of quantized codes (4 k-tiles of 16 int4 codes, 2 of int8)."""
    return {16: 256, 8: 32, 4: 64}[bits]


QUANT_BITS = (4, 8)
GROUP_MULTIPLE = 16  # one tensor-core k-tile: a scale group spans whole k-tiles of the quantized GEMV


def quant_refusal(bits: int, group: int) -> str | None:
    """Why the cuda kernels cannot take int`bits` codes in groups of `group` columns (0: per channel), or None."""
    if bits not in QUANT_BITS or (group and group % GROUP_MULTIPLE):
        return (
            f"target cuda has int8 and int4 kernels with groups that are multiples of {GROUP_MULTIPLE} columns "
            "(or per-channel scales), e.g. int4_g32, int4_g128, int8"
        )
    return None


def padded_rows(n: int) -> int:
    """Quantized codes and scales come in row tiles of 16 (the `mma` tile); padding rows are never stored."""
    return -(-n // 16) * 16


def padded_cols(k: int, bits: int, group: int = 0) -> int:
    """K padded to whole tiles and whole groups (the padding holds zero weights; the activations are
    zero-padded to match). One group over the whole row (per-channel scales) needs whole tiles only."""
    m = math.lcm(tile_cols(bits), group) if 0 < group < k else tile_cols(bits)
    return -(-k // m) * m


def scale_group(k: int, bits: int, group: int) -> int:
    """Columns per scale in the padded row: the group, or the whole padded row for per-channel scales."""
    return group if 0 < group < k else padded_cols(k, bits, group)


def storage_columns(kp: int, bits: int = 16) -> np.ndarray:
    """The natural column at each storage position of an fp16 row: lane tx's load of tile t holds, at slot p,
    column t*256 + 128*(p // 4) + 4*tx + p % 4 (kp a multiple of 256)."""
    e = 128 // bits
    pos = np.arange(kp)
    t, r = np.divmod(pos, 32 * e)
    tx, p = np.divmod(r, e)
    return t * 32 * e + 128 * (p // 4) + 4 * tx + p % 4


def code_index(r: Any, c: Any, bits: int) -> tuple[Any, Any, Any]:
    """(row tile, word, bit shift) of the code of row r, natural column c in the `Quant` layout; r and c
    may be ints, numpy arrays or TIR/TE index expressions. Lane 4g + t of k-tile kt holds rows g, g+8 and
    columns 2t, 2t+1, 2t+8, 2t+9 of it: fragment element 2 * (r // 8 % 2 + 2 * (c // 8 % 2)) + c % 2."""
    hr, g, hc, t, pe = r // 8 % 2, r % 8, c // 8 % 2, c % 8 // 2, c % 2
    lane = g * 4 + t
    if bits == 4:  # one word per lane and k-tile, 4 k-tiles per load; nibbles a0 a2 a4 a6 a1 a3 a5 a7
        return r // 16, c // 64 * 128 + lane * 4 + c // 16 % 4, (pe * 4 + hc * 2 + hr) * 4
    # int8: two words per lane and k-tile (a0 a2 a1 a3 | a4 a6 a5 a7), 2 k-tiles per load
    return r // 16, c // 32 * 128 + lane * 4 + c // 16 % 2 * 2 + hc, (pe * 2 + hr) * 8


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


def _pad_rows(a: Any, n: int) -> Any:
    """[N, K] -> [n, K], zero-filled (numpy or torch)."""
    pad = n - a.shape[0]
    if not pad:
        return a
    if isinstance(a, np.ndarray):
        return np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)], axis=0)
    return _torch().cat([a, a.new_zeros(pad, a.shape[1])], 0)


def _torch():
    import torch

    return torch


def _f16(a: Any) -> Any:
    return a.astype(np.float16) if isinstance(a, np.ndarray) else a.to(_torch().float16)


def _fragments(c: Any, bits: int) -> Any:
    """Codes [Np, Kp] -> [Np/16, words, codes per word] in `mma` fragment order (see `code_index`)."""
    rt, kp = c.shape[0] // 16, c.shape[1]
    if bits == 4:  # rows (rt, hr, g), columns (kb, j, hc, t, pe) -> (rt, kb, g, t, j | pe, hc, hr)
        a, perm = c.reshape(rt, 2, 8, kp // 64, 4, 2, 4, 2), (0, 3, 2, 6, 4, 7, 5, 1)
    else:  # columns (kb, jj, hc, t, pe) -> (rt, kb, g, t, jj, hc | pe, hr)
        a, perm = c.reshape(rt, 2, 8, kp // 32, 2, 2, 4, 2), (0, 3, 2, 6, 4, 5, 7, 1)
    a = a.transpose(perm) if isinstance(a, np.ndarray) else a.permute(perm)
    return a.reshape(rt, -1, 32 // bits)


def pack_codes(codes: Any, bits: int) -> Any:
    """Codes [N, Kp] (numpy uint8 or a torch tensor on any device) -> the kernel's int32 words
    [Np/16, Kp * bits / 2]: rows padded to whole tiles, codes in fragment order (int4: 8 per word at bits
    4i, int8: 4 per word at bits 8i)."""
    if isinstance(codes, np.ndarray):
        a = _fragments(_pad_rows(np.ascontiguousarray(codes, dtype=np.uint8), padded_rows(codes.shape[0])), bits)
        if bits == 8:
            return np.ascontiguousarray(a).view(np.int32).reshape(a.shape[0], -1)
        a = a.astype(np.uint32)
        words = np.zeros(a.shape[:2], dtype=np.uint32)
        for j in range(8):
            words |= (a[..., j] & 15) << (4 * j)
        return words.view(np.int32)
    torch = _torch()
    a = _fragments(_pad_rows(codes.to(torch.uint8), padded_rows(codes.shape[0])), bits)
    if bits == 8:
        return a.contiguous().view(torch.int32).reshape(a.shape[0], -1).contiguous()
    a = a.to(torch.int32)
    words = torch.zeros(a.shape[:2], dtype=torch.int32, device=codes.device)
    for j in range(8):
        words |= (a[..., j] & 15) << (4 * j)
    return words.contiguous()


def packed_shapes(n: int, k: int, bits: int, group: int, sym: bool) -> list[tuple[tuple[int, ...], str]]:
    """Shape and dtype of each part for a weight [n, k] (k as the model has it)."""
    kp = padded_cols(k, bits, group)
    ng = kp // scale_group(k, bits, group)
    npad = padded_rows(n)
    out: list[tuple[tuple[int, ...], str]] = [
        ((npad // 16, kp * bits // 2), "int32"),
        ((npad, ng), "float16"),
    ]
    if not sym:
        out.append(((npad, ng), "float16"))
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
        return QuantKey(self.bits, self.group, self.sym, self.part).format(QPREFIX)

    def pack(self, arrays: list[Any]) -> list[Any]:
        codes, scales, zeros = split_sources(arrays)
        k, npad = codes.shape[1], padded_rows(codes.shape[0])
        # padding columns hold the last zero point (rounded): they meet the zero-padded input
        codes = pad_codes(codes, zeros, padded_cols(k, self.bits, self.group), self.bits)
        ng = codes.shape[1] // scale_group(k, self.bits, self.group)
        out = [pack_codes(codes, self.bits), _pad_rows(_pad_cols(_f16(scales), ng), npad)]
        if not self.sym:
            out.append(_pad_rows(_pad_cols(_f16(-zeros * scales), ng), npad))
        return [a if isinstance(a, np.ndarray) else a.contiguous() for a in out]

    def pack_torch(self, tensors: list[Any]) -> list[Any]:
        return self.pack(tensors)


@register_parser
def _parse(key: str) -> Layout | None:
    if key == PREFIX + "f16":
        return F16()
    q = QuantKey.parse(key, QPREFIX)
    return None if q is None else Quant(part=q.part, bits=q.bits, group=q.group, sym=q.sym)
