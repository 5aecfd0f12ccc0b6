"""Paged KV cache: page pool allocation and page tables.

Every layer's cache is one tensor `[pages, 2, kv_heads, page_size, head_dim]`; a sequence owns a list
of page indices, and the page table row for it lists them in order (position p lives in page
`pages[p // page_size]`, slot `p % page_size`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from .errors import KilnError


class OutOfPages(KilnError, RuntimeError):
    """No free KV page for an allocation (the scheduler preempts on it; a direct caller sees the counts)."""


class PagePool:
    """Free list of page indices shared by all layers (a page index names the same slot in each)."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError("the KV cache needs at least one page")
        self.num_pages, self.page_size = num_pages, page_size
        self.free = list(range(num_pages - 1, -1, -1))
        self.on_release: list = []  # callbacks(pages) when pages come back (StateSlots frees a slot)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def alloc(self, n: int) -> list[int]:
        if n > len(self.free):
            raise OutOfPages(f"need {n} KV pages, {len(self.free)} free of {self.num_pages}")
        return [self.free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self.free.extend(reversed(pages))
        for cb in self.on_release:
            cb(pages)

    @property
    def used(self) -> int:
        return self.num_pages - len(self.free)


def page_table(rows: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
    """Page lists of a batch -> [batch, width] int32 (default width: the longest list; padded with page 0,
    never read). The graphs take a fixed width (the artifact's pages a sequence at most); reading the lists is
    what costs (~0.25 ms for 256 sequences of 34 pages here, as with a loop of row copies)."""
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    out = np.zeros((len(rows), max(1, int(lens.max(initial=0))) if width is None else width), dtype=np.int32)
    out[np.arange(out.shape[1]) < lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lens.sum())
    )
    return out


class PageManager:
    """Reference-counted pages over a `PagePool`, with a prefix cache and copy-on-write.

    A page holds `page_size` consecutive positions of one sequence. A full page whose tokens (and every
    token before it) are known can be *registered* under a hash chain of the token prefix; a later sequence
    whose tokens start with the same prefix takes a reference on it instead of recomputing it. A registered
    or shared page is immutable: `writable()` copies it to a fresh page first (copy-on-write). Registered
    pages nobody references stay cached and are evicted least-recently-used when the free list runs dry.
    `copy_page(src, dst)` copies one page's slots in every layer (the engine's `KVLayout.copy_page`).
    """

    def __init__(self, pool: PagePool, copy_page=None, prefix_caching: bool = True) -> None:
        import collections

        self.pool, self.page_size = pool, pool.page_size
        self.copy_page = copy_page
        self.prefix_caching = prefix_caching
        self.ref = [0] * pool.num_pages
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, ref 0, LRU first
        self.hit_tokens = self.query_tokens = self.evictions = self.cow_copies = 0
        self.peak_used = 0

    # -- accounting -------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def available(self) -> int:
        """Pages an allocation can get now: free plus cached pages nobody references."""
        return len(self.pool.free) + len(self.evictable)

    @property
    def used(self) -> int:
        return self.pool.num_pages - self.available

    def stats(self) -> dict:
        return {
            "pages_total": self.num_pages,
            "pages_used": self.used,
            "pages_free": len(self.pool.free),
            "pages_cached": len(self.by_hash),
            "pages_cached_idle": len(self.evictable),
            "pages_peak_used": self.peak_used,
            "prefix_hit_tokens": self.hit_tokens,
            "prefix_query_tokens": self.query_tokens,
            "prefix_evictions": self.evictions,
            "cow_copies": self.cow_copies,
        }

    # -- allocation -------------------------------------------------------------------------------
    def alloc(self, n: int) -> list[int]:
        if n > self.available:
            raise OutOfPages(f"need {n} KV pages, {self.available} available of {self.num_pages}")
        out = []
        for _ in range(n):
            if self.pool.free:
                p = self.pool.alloc(1)[0]
            else:
                p, _ = self.evictable.popitem(last=False)
                del self.by_hash[self.hash_of.pop(p)]
                self.evictions += 1
            self.ref[p] = 1
            out.append(p)
        self.peak_used = max(self.peak_used, self.used)
        return out

    def incref(self, p: int) -> None:
        if self.ref[p] == 0:
            self.evictable.pop(p, None)
        self.ref[p] += 1
        self.peak_used = max(self.peak_used, self.used)

    def release(self, pages: list[int]) -> None:
        for p in pages:
            self.ref[p] -= 1
            assert self.ref[p] >= 0, f"page {p} released twice"
            if self.ref[p] == 0:
                if p in self.hash_of:
                    self.evictable[p] = None  # keep the contents for a later prefix hit
                else:
                    self.pool.release([p])

    def writable(self, pages: list[int], i: int) -> None:
        """Make pages[i] private to its owner before a write: copy it if shared or registered."""
        p = pages[i]
        if self.ref[p] > 1 or p in self.hash_of:
            q = self.alloc(1)[0]
            if self.copy_page is None:
                raise RuntimeError("copy-on-write needs copy_page")
            self.copy_page(p, q)
            self.cow_copies += 1
            self.release([p])
            pages[i] = q

    def ensure(self, pages: list[int], positions: int) -> None:
        """Grow `pages` (in place) so positions 0..positions-1 have a page; raises OutOfPages."""
        need = self.pool.pages_for(positions) - len(pages)
        if need > 0:
            pages.extend(self.alloc(need))

    def clear_cache(self) -> None:
        """Forget the prefix index; idle cached pages go back to the pool's free list."""
        for p in list(self.evictable):
            self.pool.release([p])
        self.evictable.clear()
        self.by_hash.clear()
        self.hash_of.clear()

    # -- prefix cache -----------------------------------------------------------------------------
    def _chain(self, tokens, n_pages: int, start_hash: bytes = b"") -> list[bytes]:
        import hashlib

        out, h, ps = [], start_hash, self.page_size
        for i in range(n_pages):
            blk = np.asarray(tokens[i * ps : (i + 1) * ps], dtype=np.int64).tobytes()
            h = hashlib.blake2b(h + blk, digest_size=16).digest()
            out.append(h)
        return out

    def match(self, tokens) -> list[int]:
        """Longest run of cached full pages that starts `tokens`; takes a reference on each."""
        self.query_tokens += len(tokens)
        if not self.prefix_caching:
            return []
        pages = []
        for h in self._chain(tokens, len(tokens) // self.page_size):
            p = self.by_hash.get(h)
            if p is None:
                break
            self.incref(p)
            pages.append(p)
        self.hit_tokens += len(pages) * self.page_size
        return pages

    def register(self, tokens, pages: list[int], computed: int, registered: int) -> int:
        """Index the full pages among positions 0..computed-1 (their KV is written and final); pages
        before `registered` are already indexed. Returns the new registered count."""
        if not self.prefix_caching:
            return registered
        full = min(computed // self.page_size, len(pages))
        if full <= registered:
            return registered
        hashes = self._chain(tokens, full)
        for i in range(registered, full):
            h, p = hashes[i], pages[i]
            if p in self.hash_of:
                continue
            if h in self.by_hash:  # same prefix computed twice (two requests in flight): keep the first
                continue
            self.by_hash[h], self.hash_of[p] = p, h
        return full


class StateSlots:
    """State slots of the state-space layers: one fixed-size state row per live sequence.

    The program finds a sequence's row as `table[first page of the sequence]` (`table` is a host view of
    the program's `kv_cache_slots [pages]`). A sequence is given a slot when its prefill starts (position
    0) and gives it back when its first page returns to the pool (the pool's `on_release`), so the
    scheduler's page accounting stays the one place that knows when a sequence ends. A state needs no
    clearing: the kernels start from zeros at position 0."""

    def __init__(self, table: np.ndarray, num_slots: int, pool: PagePool) -> None:
        if num_slots < 1:
            raise ValueError("state-space layers need at least one state slot")
        self.table, self.num_slots = table, num_slots
        self.slot_of: dict[int, int] = {}  # first page of a live sequence -> its slot
        self.free = list(range(num_slots - 1, -1, -1))
        pool.on_release.append(self.release)

    def assign(self, first_page: int) -> int:
        """The slot of a sequence starting at `first_page` (written into the table)."""
        slot = self.slot_of.get(first_page)
        if slot is None:
            if not self.free:
                raise OutOfPages(
                    f"all {self.num_slots} state slots hold live sequences: load the engine with more "
                    "state_slots, or run fewer sequences at once"
                )
            slot = self.slot_of[first_page] = self.free.pop()
        self.table[first_page] = slot
        return slot

    def release(self, pages: list[int]) -> None:
        for p in pages:
            slot = self.slot_of.pop(p, None)
            if slot is not None:
                self.free.append(slot)
