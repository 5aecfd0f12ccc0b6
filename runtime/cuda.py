"""Running `cuda` artifacts with TVM's runtime only: GPU checks and the device-code cache.

A cuda artifact's library holds CUDA C source for its kernels. When the library is loaded, TVM asks
the global function `tvm_callback_cuda_compile` for the binary; kiln answers from a cache keyed by
the source and the architecture, and on a miss compiles once with `nvcc --fatbin` for the
artifact's architecture. The GPU must match the architecture the artifact was built for.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

from .artifact import ArtifactError

_STATE: dict = {}


def cache_dir() -> str:
    return os.environ.get("KILN_CUDA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kiln", "cuda")


def _load_cuda_runtime(tvm) -> None:
    """In runtime-only mode TVM's CUDA support lives in its own library; load it once."""
    if _STATE.get("lib_loaded"):
        return
    path = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    if os.path.exists(path) and os.environ.get("TVM_USE_RUNTIME_LIB"):
        ctypes.CDLL(path, ctypes.RTLD_GLOBAL)
    _STATE["lib_loaded"] = True


def compile_source(code: str, arch: str) -> bytes:
    """CUDA source -> fatbin for `arch`, through the cache (nvcc on a miss)."""
    key = hashlib.sha256((arch + "\0" + code).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir(), f"{key}.{arch}.fatbin")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read()
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    if nvcc is None:
        raise ArtifactError(f"this cuda artifact's kernels are not compiled for {arch} yet and no nvcc was found: "
                            "install the CUDA toolkit (nvcc) once, or copy a filled cache into "
                            f"{cache_dir()} (KILN_CUDA_CACHE)")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.fatbin")
        with open(src, "w") as f:
            f.write(code)
        r = subprocess.run([nvcc, "--fatbin", "-O3", f"-arch={arch}", "-o", out, src], capture_output=True, text=True)
        if r.returncode:
            raise ArtifactError(f"nvcc failed to compile the artifact's kernels for {arch}:\n{r.stderr[-3000:]}")
        with open(out, "rb") as f:
            data = f.read()
    os.makedirs(cache_dir(), exist_ok=True)
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "wb") as f:
        f.write(data)
    os.replace(tmp_path, path)
    return data


def prepare(manifest: dict):
    """Check the GPU against the artifact and install the compile callback; returns the TVM device."""
    import tvm
    import tvm_ffi
    _load_cuda_runtime(tvm)
    t = manifest.get("target", {})
    arch, want = t.get("arch", "?"), t.get("compute_capability")
    dev = tvm.cuda(0)
    if not dev.exist:
        raise ArtifactError(f"artifact was built for target 'cuda' ({arch}) but no CUDA GPU is visible here: "
                            "run it on a machine with an NVIDIA GPU, or rebuild with --target cpu")
    have = str(dev.compute_version)
    if want and have != want:
        raise ArtifactError(f"artifact was built for {arch} (compute capability {want}) but this GPU "
                            f"({dev.device_name}) is compute capability {have}: rebuild with "
                            f"--cuda-arch sm_{have.replace('.', '')}")

    def _compile(code, *_):
        return compile_source(str(code), arch)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile, override=True)
    return dev
