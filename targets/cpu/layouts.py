"""Weight layouts of the cpu target's kernels (see targets/cpu/kernels.py and qkernels.py).

- `Blocked`: fp32 [ceil(N/NB), K, NB], 32 output lanes per block, zero-padded rows; several weights
  concatenated along the output rows form one field (the gated MLP's gate and up).
- `BlockedQuant`: int8/int4 codes in the same blocks (two int4 lanes per byte), with pre-multiplied
  scales (and zero points) per group; a ragged last group is padded with zero-valued codes.
- `Sparse24` / `Sparse24Quant`: a 2:4 weight compressed (targets/cpu/sparse24.py): the kept values
  (fp32, or their codes with the dense scheme's scales) and the 2-bit positions, in the same blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.targets.common.layouts import Layout, QuantKey, pad_codes, padded_k, register_parser, split_sources

NB = 32  # output lanes per packed block; the kernels' NB (kernels.py) is this value


@dataclass(frozen=True)
class Blocked(Layout):
    concat: bool = False  # several sources concatenated along the output rows

    def key(self) -> str:
        return "linear_cat" if self.concat else "linear"

    def shape(self, rows: int, k: int) -> tuple[int, ...]:
        return (-(-rows // NB), k, NB)

    def pack(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        from .kernels import pack_linear_weight

        return [pack_linear_weight(np.concatenate(arrays, axis=0) if self.concat else arrays[0])]


@dataclass(frozen=True)
class BlockedQuant(Layout):
    bits: int = 4
    group: int = 128
    sym: bool = False

    def key(self) -> str:
        return QuantKey(self.bits, self.group, self.sym, self.part).format()

    def shapes(self, rows: int, k: int) -> list[tuple[tuple[int, ...], str]]:
        """Shape and dtype of every part, for a weight [rows, k] (k padded to whole groups)."""
        from .qkernels import packed_shapes

        return packed_shapes(rows, padded_k(k, self.group), self.bits, self.group, self.sym)

    def pack(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        from .qkernels import pack_qweight

        codes, scales, zeros = split_sources(arrays)
        codes = pad_codes(codes.astype(np.int32), zeros, self.group, self.bits)
        return pack_qweight(codes, scales, None if self.sym else zeros, self.bits, self.group, self.sym)


@dataclass(frozen=True)
class Sparse24(Layout):
    """fp32 2:4 weights (several concatenated along the output rows): part 0 values, part 1 index."""

    compressed = True  # already holds only the kept values: not recompressed for storage

    def key(self) -> str:
        return f"s24:{self.part}"

    def shapes(self, rows: int, k: int) -> list[tuple[tuple[int, ...], str]]:
        from .sparse24 import sparse24_shapes

        return sparse24_shapes(rows, k, None)

    def pack(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        from .sparse24 import pack_sparse24

        return pack_sparse24(np.concatenate(arrays, axis=0))

    def dense_bytes(self, shape: tuple[int, ...], dtype: str) -> int:
        return 2 * super().dense_bytes(shape, dtype) if self.part == 0 else 0  # K/2 kept values; no index


@dataclass(frozen=True)
class Sparse24Quant(Layout):
    """Quantized 2:4 weights: the kept values' codes, scales, (zero points), index (sparse24.py)."""

    bits: int = 4
    group: int = 128
    sym: bool = False
    compressed = True

    def key(self) -> str:
        return QuantKey(self.bits, self.group, self.sym, self.part).format(prefix="s24")

    def shapes(self, rows: int, k: int) -> list[tuple[tuple[int, ...], str]]:
        from .sparse24 import sparse24_shapes

        return sparse24_shapes(rows, padded_k(k, self.group), (self.bits, self.group, self.sym))

    def pack(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        from .sparse24 import pack_sparse24_quant

        codes, scales, zeros = split_sources(arrays)
        codes = pad_codes(codes.astype(np.int32), zeros, self.group, self.bits)
        return pack_sparse24_quant(codes, scales, zeros, self.bits, self.group, self.sym)

    def dense_bytes(self, shape: tuple[int, ...], dtype: str) -> int:
        if self.part == 0:
            return 2 * super().dense_bytes(shape, dtype)  # codes of K/2 kept values
        last = 2 if self.sym else 3  # the index, after codes, scales (and zero points)
        return 0 if self.part == last else super().dense_bytes(shape, dtype)


@register_parser
def _parse(key: str) -> Layout | None:
    if key in ("linear", "linear_cat"):
        return Blocked(concat=key == "linear_cat")
    if key.startswith("s24:"):
        return Sparse24(part=int(key[4:]))
    sq = QuantKey.parse(key, prefix="s24")
    if sq is not None:
        return Sparse24Quant(part=sq.part, bits=sq.bits, group=sq.group, sym=sq.sym)
    q = QuantKey.parse(key)
    return None if q is None else BlockedQuant(part=q.part, bits=q.bits, group=q.group, sym=q.sym)
