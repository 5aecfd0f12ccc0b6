"""The paged KV cache's tensors, as the artifact's manifest describes them, on the engine's device.

The kv-cache pass decides the layout and the manifest records it: one entry per cache input of the
program, in input order, with the page count left symbolic for the runtime to choose:

    {"name": "k_cache_0", "shape": ["pages", "2", "3", "16", "8"], "dtype": "float32"}
    # pages: [num_pages, 2 (key, value), kv_heads, page_size, head_dim]

`KVLayout` binds the page count, allocates the tensors the VM takes, and copies pages between them
(copy-on-write of a shared prefix page). The copies go through DLPack views of the TVM tensors: numpy
on the CPU; on a CUDA device numpy cannot address the memory, so torch views do the copy there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ArtifactError, KilnError

PAGES = "pages"  # the symbolic dimension a runtime chooses
SLOTS = "slots"  # state-space layers: one row of fixed-size state per sequence (a count the runtime chooses)
_CPU, _CUDA = 1, 2  # DLPack device types


@dataclass(frozen=True)
class CacheTensor:
    """One cache input of the program: its shape with `PAGES` where the page count goes, and its dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @property
    def page_axis(self) -> int:
        return self.shape.index(PAGES)

    @property
    def paged(self) -> bool:
        """A KV cache tensor holding positions in pages (not a state tensor nor the slot table)."""
        return PAGES in self.shape and len(self.shape) > 1

    def bind(self, pages: int, slots: int = 0) -> tuple[int, ...]:
        """The concrete shape for a pool of `pages` pages (and `slots` state slots)."""
        return tuple(pages if d == PAGES else slots if d == SLOTS else int(d) for d in self.shape)


class KVLayout:
    """The cache tensors of one artifact on one device: shapes, dtypes, page size, allocation, page copies."""

    def __init__(self, tensors: tuple[CacheTensor, ...], page_size: int, device: Any) -> None:
        self.tensors, self.page_size, self.device = tensors, page_size, device
        self.num_pages = 0
        self.caches: tuple = ()
        self._copy: Callable[[int, int], None] | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], device: Any) -> KVLayout:
        """Read `manifest["kv_cache"]`; an artifact without one (or with a malformed one) is refused."""
        kv = manifest.get("kv_cache")
        if not isinstance(kv, dict) or "tensors" not in kv or "page_size" not in kv:
            raise ArtifactError(
                "the manifest describes no paged KV cache (kv_cache.tensors, kv_cache.page_size): "
                "build the artifact with the kv-cache pass in its pipeline"
            )
        try:
            tensors = tuple(
                CacheTensor(
                    str(t.get("name", f"cache_{i}")),
                    tuple(d if d in (PAGES, SLOTS) else int(d) for d in t["shape"]),
                    str(t["dtype"]),
                )
                for i, t in enumerate(kv["tensors"])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"the manifest's kv_cache.tensors is malformed ({e!r}); rebuild the artifact") from e
        for t in tensors:
            if PAGES not in t.shape and SLOTS not in t.shape:
                raise ArtifactError(
                    f"KV cache tensor '{t.name}' {list(t.shape)} has no '{PAGES}' nor '{SLOTS}' dimension; "
                    "rebuild the artifact"
                )
        layout = cls(tensors, int(kv["page_size"]), device)
        layout.state = kv.get("state")
        return layout

    state: dict[str, Any] | None = None  # the manifest's kv_cache.state: state-space layers, if any

    def shapes(self, pages: int, slots: int = 0) -> list[tuple[int, ...]]:
        return [t.bind(pages, slots) for t in self.tensors]

    def allocate(self, pages: int, slots: int = 0) -> tuple:
        """Zeroed cache tensors for `pages` pages (and `slots` state slots) on the device, in the program's
        input order. The layout keeps them: `copy_page` works on these."""
        from .tvm_import import aligned_zeros, host_tensor

        self.num_pages = pages
        # on the CPU the zeroed memory is shared with TVM, not copied: pages are committed as they are used
        self.caches = tuple(
            host_tensor(aligned_zeros(t.bind(pages, slots), t.dtype), self.device) for t in self.tensors
        )
        self._copy = None
        return self.caches

    def slot_table(self) -> np.ndarray | None:
        """A writable host view of `kv_cache_slots [pages]` (the state slot of the sequence whose first page
        is that page), or None for a model without state-space layers."""
        if not self.state:
            return None
        i = [t.name for t in self.tensors].index(self.state["slot_table"])
        if self.device.dlpack_device_type() != _CPU:
            raise KilnError(f"state-space layers are served on the CPU only; this artifact runs on {self.device}")
        return np.from_dlpack(self.caches[i])

    def copy_page(self, src: int, dst: int) -> None:
        """Copy page `src` to page `dst` in every cache tensor (copy-on-write of a shared page)."""
        if self._copy is None:
            if not self.caches:
                raise RuntimeError("copy_page before allocate: the layout has no cache tensors yet")
            self._copy = self._copier()
        self._copy(src, dst)

    def _copier(self) -> Callable[[int, int], None]:
        """A page copy through zero-copy views of the cache tensors, made once for the device."""
        kind = self.device.dlpack_device_type()
        paged = [i for i, t in enumerate(self.tensors) if t.paged]  # state tensors are not paged
        axes = [self.tensors[i].page_axis for i in paged]
        if kind == _CPU:
            views = [np.from_dlpack(self.caches[i]) for i in paged]

            def copy_cpu(src: int, dst: int) -> None:
                for v, ax in zip(views, axes):
                    v[(slice(None),) * ax + (dst,)] = v[(slice(None),) * ax + (src,)]

            return copy_cpu
        if kind == _CUDA:
            try:
                import torch
            except ImportError as e:
                raise KilnError(
                    f"copying KV pages on {self.device} needs torch (numpy cannot address GPU memory; "
                    "the copy goes through torch's DLPack views): install torch, or serve without "
                    "prefix caching (Server(..., prefix_caching=False)), which copies no page"
                ) from e
            tviews = [torch.from_dlpack(self.caches[i]) for i in paged]
            stream = torch.cuda.current_stream(tviews[0].device)

            def copy_cuda(src: int, dst: int) -> None:
                for v, ax in zip(tviews, axes):
                    v.select(ax, dst).copy_(v.select(ax, src))
                stream.synchronize()  # the next program call may run on TVM's own stream

            return copy_cuda
        raise KilnError(f"copying KV pages on {self.device} is not supported: kiln copies pages on cpu and cuda")
