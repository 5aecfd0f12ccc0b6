"""Import TVM for the runtime without dragging torch in.

`tvm_ffi` (imported by `import tvm`) tries `import torch` first whenever torch is installed, only to
work around a symbol clash seen on Windows; on a full install that costs seconds of start-up and
hundreds of modules the runtime never uses. When torch is not loaded yet, `load_tvm` hides it for the
length of the TVM import, so a process that only loads and serves artifacts never imports torch. A
process that has imported torch already (the compiler, tests) gets TVM exactly as `import tvm` would.

`TVM_USE_RUNTIME_LIB=1` (set by the bundle launchers, see kiln.runtime.cli) makes TVM open
`libtvm_runtime.so` alone and skip `tvm.relax`; TVM falls back to that mode by itself when
`libtvm_compiler.so` is absent, as in a bundle.
"""

from __future__ import annotations

import sys
from types import ModuleType


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
