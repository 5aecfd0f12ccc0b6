"""What the cuda target's `sample` kernel (targets/cuda/sample.py) computes, in numpy: the tests' reference,
importable on the GPU host (TVM's runtime only)."""

from __future__ import annotations

import numpy as np


def _mix32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def gumbel(key: int, vocab: int) -> np.ndarray:
    """The device's Gumbel noise of a row keyed `key` (float32, as the kernel computes it up to its logf)."""
    h = _mix32(np.arange(vocab, dtype=np.uint64) ^ _mix32(np.array([key & 0xFFFFFFFF]))[0])
    u = ((h >> 8).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 16777216.0)
    return -np.log(-np.log(u.astype(np.float64)))


def reference(logits: np.ndarray, temp: np.ndarray, key: np.ndarray) -> np.ndarray:
    """What `sample` computes, in numpy: logits [B, T, V] -> tokens [B] (int32)."""
    last = logits[:, -1].astype(np.float64)
    out = np.zeros(last.shape[0], dtype=np.int32)
    for b, row in enumerate(last):
        z = row / temp[b] + gumbel(int(key[b]), row.shape[0]) if temp[b] > 0 else row
        z = np.where(np.isnan(z), -np.inf, z)
        out[b] = int(np.argmax(z)) if np.isfinite(z).any() else 0
    return out
