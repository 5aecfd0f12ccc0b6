"""Checks at the engine's door: token ids, positions and page tables are checked before the compiled
program sees them, because the program does not check them itself.

The kernels index the embedding table with the token ids and the KV cache with the page table, without
bounds checks (a check per element would cost every step). An id >= vocab reads past the table: garbage
by a little, a segfault by a lot. So everything that reaches `prefill`, `decode` or `verify` is checked
here, once per call, in numpy, and refused with a `ValueError` naming the field and the valid range.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])


def token_ids(ids: Sequence[Any], vocab: int, what: str = "prompt") -> list[int]:
    """`ids` as a list of ints, each in [0, vocab); anything else is refused naming `what` and the vocab."""
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{what} must be token ids (ints), got {type(ids).__name__}")
    if isinstance(ids, list) and set(map(type, ids)) <= {int} and (not ids or (min(ids) >= 0 and max(ids) < vocab)):
        return list(ids)  # the common case, checked in bulk (a long prompt's loop below costs ~0.3 ms)
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise ValueError(
                f"{what}[{i}] is {t!r} ({type(t).__name__}): token ids are ints in [0, {vocab}), the "
                "artifact's vocab size"
            )
        t = int(t)
        if not 0 <= t < vocab:
            raise ValueError(
                f"{what}[{i}] is {t}, outside the vocab: token ids are ints in [0, {vocab}) for this artifact"
            )
        out.append(t)
    return out


def _int_array(a: Any, what: str, ndim: int) -> np.ndarray:
    try:
        x = np.asarray(a)
    except (ValueError, TypeError) as e:  # ragged rows
        raise ValueError(f"{what} must be a rectangular array of ints ({e})") from e
    if x.dtype.kind not in "iu" and not (x.size == 0 and x.dtype.kind == "f"):
        raise ValueError(f"{what} must hold ints, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimension(s), got shape {list(x.shape)}")
    return x.astype(np.int64)


def column(a: Any, what: str) -> np.ndarray:
    """One value per sequence (decode's tokens and positions) as a [batch, 1] array."""
    x = np.asarray(a)
    if x.ndim != 1:
        raise ValueError(f"{what} must be a flat list, one value per sequence; got shape {list(x.shape)}")
    return x[:, None]


def entry_inputs(
    eng: Any, tokens: Any, positions: Any, pages: Sequence[Sequence[int]], entry: str
) -> tuple[np.ndarray, np.ndarray]:
    """Check one call of a raw entry point: tokens and positions [batch, n] (ints, same shape, ids in
    [0, vocab), positions in [0, max_context)), one page list per row, every page inside the pool and
    enough pages for the row's highest position. Returns (tokens, positions) as int64 arrays."""
    x = _int_array(tokens, f"{entry}: tokens", 2)
    pos = _int_array(positions, f"{entry}: positions", 2)
    if x.shape != pos.shape:
        raise ValueError(f"{entry}: tokens {list(x.shape)} and positions {list(pos.shape)} must have one shape")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{entry}: give at least one sequence of at least one token, got shape {list(x.shape)}")
    if len(pages) != x.shape[0]:
        raise ValueError(f"{entry}: {len(pages)} page lists for {x.shape[0]} sequences: give one per sequence")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= eng.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{entry}: token id {bad} is outside the vocab: ids are ints in [0, {eng.vocab_size})")
    lo, hi = int(pos.min()), int(pos.max())
    if lo < 0 or hi >= eng.max_context:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{entry}: position {bad} is outside the artifact's context: positions are in [0, {eng.max_context})"
        )
    ps, n_pages = eng.page_size, eng.pool.num_pages
    width = -(-eng.max_context // ps)
    lens = [len(row) for row in pages]
    need = pos.max(axis=1) // ps + 1  # one check per call, not per row: decode runs this every step
    for i in np.flatnonzero((np.asarray(lens) < need) | (np.asarray(lens) > width))[:1]:
        raise ValueError(
            f"{entry}: sequence {i} reaches position {int(pos[i].max())} and needs {int(need[i])} pages of "
            f"{ps}, at most {width}; its page list has {lens[i]}"
        )
    rows = itertools.chain.from_iterable
    if set(map(type, rows(pages))) <= {int}:  # the common case, in bulk (decode checks every step)
        flat = np.fromiter(rows(pages), dtype=np.int64, count=sum(lens))
    else:
        flat = _int_array([p for row in pages for p in row], f"{entry}: pages", 1)
    if flat.size and (flat.min() < 0 or flat.max() >= n_pages):
        bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
        i = next(i for i, row in enumerate(pages) if bad in list(row))
        raise ValueError(f"{entry}: pages[{i}] names page {bad}; the pool has pages 0..{n_pages - 1}")
    return x, pos


def serialized(fn: F) -> F:
    """Run the method under its object's `_lock`: the TVM VM behind an engine is not re-entrant (two
    threads in it at once corrupt its registers and crash), so the engine's calls run one at a time."""

    @functools.wraps(fn)
    def run(self: Any, *a: Any, **k: Any) -> Any:
        with self._lock:
            if getattr(self, "closed", False):
                raise ValueError(f"{fn.__name__}: this engine is closed; load the artifact again to use it")
            return fn(self, *a, **k)

    return run  # type: ignore[return-value]


def page_slots(shape: Sequence[int | str]) -> int:
    """The positions per page a cache tensor holds: axis 3 of [pages, 2, kv_heads, page, head_dim] and of
    its scales [pages, 2, kv_heads, page]; axis 1 of a latent cache [pages, page, width]."""
    return int(shape[3] if len(shape) >= 4 else shape[1])


def cross_check(eng: Any) -> int:
    """Check the manifest's shape facts against each other and against the library, at load: the page
    size against every cache tensor, then one decode step on page 0 (the VM checks every input's shape
    against the compiled program, so an edited cache shape is refused here rather than at the first
    request), whose logits give the vocab size. Returns the vocab size. Writing page 0 is harmless:
    attention reads only positions its own sequence wrote."""
    from .errors import ArtifactError

    ps = eng.kv_layout.page_size
    if ps < 1:
        raise ArtifactError(f"the manifest's kv_cache.page_size is {ps}; the artifact is corrupt: rebuild it")
    for t in eng.kv_layout.tensors:
        if t.paged and page_slots(t.shape) != ps:
            raise ArtifactError(
                f"the manifest's kv_cache.page_size is {ps} but cache tensor '{t.name}' {list(t.shape)} holds "
                f"{page_slots(t.shape)} positions per page: the manifest was edited or is corrupt; rebuild the "
                "artifact"
            )
    mc = eng.manifest.get("max_context")
    if not isinstance(mc, int) or isinstance(mc, bool) or mc < 1:
        raise ArtifactError(f"the manifest's max_context is {mc!r}, not a positive int: rebuild the artifact")
    try:
        one = [eng._t(np.zeros((1, 1), dtype=d)) for d in (np.int64, np.int32, np.int32)]
        logits = eng.vm["decode"](*one, eng.caches, eng.weights).numpy()
    except Exception as e:
        lines = str(e).splitlines() or [repr(e)]
        why = next((ln for ln in lines if "Check failed" in ln or "mismatch" in ln), lines[0]).strip()[:400]
        raise ArtifactError(
            f"the library refuses the manifest's description of its inputs ({why}): "
            "the manifest was edited or belongs to another build; rebuild the artifact"
        ) from e
    vocab = int(logits.shape[-1])
    want = eng.manifest.get("model", {}).get("vocab_size")
    if isinstance(want, int) and want != vocab:
        raise ArtifactError(
            f"the manifest says vocab_size {want} but the library computes {vocab} logits: rebuild the artifact"
        )
    return vocab
