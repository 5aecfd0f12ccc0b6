"""Compact storage of sparse weights in an artifact, expanded to dense arrays at load (numpy only).

Two formats, both over a weight field exactly as the kernels read it (any layout):
- `bitmask`: one bit per element (np.packbits of `a != 0`) plus the nonzero values in order;
- `nm` (N:M along axis 1, the input dimension of the packed linear layout [blocks, K, 32]): for every
  group of M consecutive elements, N values and their N positions (2 bits each for 2:4), the positions
  of two neighbouring lanes sharing a byte.
Expanded weights are dense again: sparsity saves disk and download, not memory or time, on targets
whose kernels are dense.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def compress(a: np.ndarray, pattern: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Arrays to store (suffixes of the field's name) and the storage record, or None when the field is
    no smaller compressed (or does not hold the pattern)."""
    if pattern != "unstructured":
        n, m = (int(x) for x in pattern.split(":"))
        if a.ndim == 3 and m == 4 and a.shape[1] % m == 0 and a.shape[2] % 2 == 0:
            g = a.reshape(a.shape[0], a.shape[1] // m, m, a.shape[2])  # [blocks, K/m, m, lanes]
            nz = g != 0
            if int(nz.sum(2).max()) <= n:
                # positions of the nonzeros first (stable), zeros after: the first n slots hold them all
                order = np.argsort(~nz, axis=2, kind="stable")[:, :, :n]
                vals = np.take_along_axis(g, order, axis=2)
                code = (order[:, :, 0] | (order[:, :, 1] << 2)).astype(np.uint8) if n == 2 else None
                if code is not None:
                    packed = code[..., 0::2] | (code[..., 1::2] << 4)  # two lanes per byte
                    return (
                        {".values": np.ascontiguousarray(vals), ".index": np.ascontiguousarray(packed)},
                        {"format": "nm", "n": n, "m": m, "shape": list(a.shape), "dtype": str(a.dtype)},
                    )
    nz = a != 0
    vals = a[nz]
    if vals.nbytes + nz.size / 8 >= a.nbytes:
        return None
    return (
        {".values": np.ascontiguousarray(vals), ".mask": np.packbits(nz.reshape(-1))},
        {"format": "bitmask", "shape": list(a.shape), "dtype": str(a.dtype)},
    )


def expand(arrays: dict[str, np.ndarray], name: str, storage: dict[str, Any]) -> np.ndarray:
    """The dense field `name` from its stored arrays."""
    shape = tuple(storage["shape"])
    vals = arrays[name + ".values"]
    if storage["format"] == "bitmask":
        nz = np.unpackbits(arrays[name + ".mask"], count=int(np.prod(shape))).astype(bool).reshape(shape)
        out = np.zeros(shape, dtype=storage["dtype"])
        out[nz] = vals
        return out
    m = storage["m"]
    packed = arrays[name + ".index"]
    code = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    code[..., 0::2], code[..., 1::2] = packed & 15, packed >> 4
    order = np.stack([code & 3, (code >> 2) & 3], axis=2).astype(np.int64)  # [blocks, K/m, 2, lanes]
    g = np.zeros((shape[0], shape[1] // m, m, shape[2]), dtype=storage["dtype"])
    np.put_along_axis(g, order, vals, axis=2)
    return g.reshape(shape)
