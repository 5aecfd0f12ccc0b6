"""Import TVM for the runtime without dragging torch in, and hand it host memory without copies.

`tvm_ffi` (imported by `import tvm`) tries `import torch` first whenever torch is installed, only to
work around a symbol clash seen on Windows; on a full install that costs seconds of start-up and
hundreds of modules the runtime never uses. When torch is not loaded yet, `load_tvm` hides it for the
length of the TVM import, so a process that only loads and serves artifacts never imports torch. A
process that has imported torch already (the compiler, tests) gets TVM exactly as `import tvm` would.

`TVM_USE_RUNTIME_LIB=1` (set by the bundle launchers, see kiln.runtime.cli) makes TVM open
`libtvm_runtime.so` alone and skip `tvm.relax`; TVM falls back to that mode by itself when
`libtvm_compiler.so` is absent, as in a bundle.

`tvm.runtime.tensor(array)` allocates and copies; for the weights (hundreds of MB) and the KV cache that
copy, and the page faults of the fresh memory, were a third of the cold start. `host_tensor` shares a
numpy array's memory with TVM instead, which TVM accepts when the data is 64-byte aligned (its kernels
assume it; tvm_ffi's from_dlpack checks it): `aligned_empty` and `aligned_zeros` make such arrays.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

ALIGN = 64  # bytes: what TVM's kernels assume of every buffer, and what from_dlpack checks


def load_tvm() -> ModuleType:
    """`import tvm`, with torch hidden from tvm_ffi unless the process has imported torch already."""
    if "tvm" in sys.modules:
        return sys.modules["tvm"]
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        import tvm
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm


def _aligned(nbytes: int, zeroed: bool) -> Any:
    import numpy as np

    if not zeroed and nbytes >= 64 << 20:
        # memory about to be filled whole (the weights): mapped and faulted in by one call, page aligned.
        # np.empty would fault it 4 KB at a time, or (numpy asks for huge pages past 4 MB) stall while the
        # kernel compacts memory for them: 0.55-1.3 s for 538 MB on a busy host, against 0.4 s this way
        import mmap

        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=np.uint8)
    # np.zeros of a large size is calloc: the kernel's zero pages, touched only when written
    raw = (np.zeros if zeroed else np.empty)(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes]


def aligned_empty(shape: tuple[int, ...], dtype: str) -> Any:
    """An uninitialized C-contiguous numpy array whose data starts on a 64-byte boundary."""
    import numpy as np

    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    return _aligned(n * dt.itemsize, zeroed=False).view(dt).reshape(shape)


def aligned_zeros(shape: tuple[int, ...], dtype: str) -> Any:
    """A zeroed, 64-byte-aligned numpy array; memory is committed page by page as it is first written."""
    import numpy as np

    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    return _aligned(n * dt.itemsize, zeroed=True).view(dt).reshape(shape)


def host_tensor(a: Any, device: Any) -> Any:
    """`a` (a numpy array) as a TVM tensor on `device`. On the CPU a C-contiguous, writable, 64-byte
    aligned array is shared, not copied: the tensor keeps it alive, and writes through either are seen
    by both. Anything else (another device, a strided or unaligned array) is copied."""
    tvm = load_tvm()
    if (
        device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        and a.flags.c_contiguous
        and a.flags.writeable
        and a.ctypes.data % ALIGN == 0
        and a.size > 0
    ):
        return tvm.runtime.from_dlpack(a)
    return tvm.runtime.tensor(a, device)
