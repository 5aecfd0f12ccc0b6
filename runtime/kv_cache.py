"""Paged KV cache: page pool allocation and page tables.

Every layer's cache is one tensor `[pages, 2, kv_heads, page_size, head_dim]`; a sequence owns a list
of page indices, and the page table row for it lists them in order (position p lives in page
`pages[p // page_size]`, slot `p % page_size`).
"""
from __future__ import annotations

import numpy as np


class OutOfPages(RuntimeError):
    pass


class PagePool:
    """Free list of page indices shared by all layers (a page index names the same slot in each)."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError("the KV cache needs at least one page")
        self.num_pages, self.page_size = num_pages, page_size
        self.free = list(range(num_pages - 1, -1, -1))

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def alloc(self, n: int) -> list[int]:
        if n > len(self.free):
            raise OutOfPages(f"need {n} KV pages, {len(self.free)} free of {self.num_pages}")
        return [self.free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self.free.extend(reversed(pages))

    @property
    def used(self) -> int:
        return self.num_pages - len(self.free)


def page_table(rows: list[list[int]]) -> np.ndarray:
    """Page lists of a batch -> [batch, max_pages] int32 (padded with page 0, never read)."""
    width = max(1, max(len(r) for r in rows))
    out = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
