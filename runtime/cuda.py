"""Running `cuda` artifacts with TVM's runtime only: GPU checks and the device-code cache.

A cuda artifact's library holds CUDA C source for its kernels. When the library is loaded, TVM asks
the global function `tvm_callback_cuda_compile` for the binary; kiln answers, in this order, with the
fatbin the artifact carries for this source and architecture (`kiln kernels`, runtime/cuda_kernels.py),
from a cache keyed by the source and the architecture, and on a miss by compiling once with
`nvcc --fatbin` for the artifact's architecture. The GPU must match the architecture the artifact was
built for.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

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
    from .cuda_kernels import nvcc_path

    nvcc = nvcc_path()
    if nvcc is None:
        raise ArtifactError(
            f"this cuda artifact's kernels are not compiled for {arch} yet and no nvcc was found: "
            "install the CUDA toolkit (nvcc) once, or store compiled kernels in the artifact where nvcc is "
            f"(kiln kernels ARTIFACT), or copy a filled cache into {cache_dir()} (KILN_CUDA_CACHE)"
        )
    data = nvcc_fatbin(code, arch, nvcc)
    os.makedirs(cache_dir(), exist_ok=True)
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "wb") as f:
        f.write(data)
    os.replace(tmp_path, path)
    return data


def nvcc_fatbin(code: str, arch: str, nvcc: str) -> bytes:
    """Compile CUDA source with `nvcc --fatbin -O3 -arch=ARCH` (no GPU needed)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.fatbin")
        with open(src, "w") as f:
            f.write(code)
        r = subprocess.run([nvcc, "--fatbin", "-O3", f"-arch={arch}", "-o", out, src], capture_output=True, text=True)
        if r.returncode:
            raise ArtifactError(f"nvcc failed to compile the artifact's kernels for {arch}:\n{r.stderr[-3000:]}")
        with open(out, "rb") as f:
            return f.read()


def kernel_binary(code: str, arch: str, path: str | None = None, manifest: dict | None = None) -> bytes:
    """What `tvm_callback_cuda_compile` answers: the artifact's own fatbin for this source and arch when
    it carries one, else the cache's, else nvcc's. Notes on kernels passed over go to stderr."""
    if path is not None and manifest is not None:
        from .cuda_kernels import artifact_kernel

        data, notes = artifact_kernel(path, manifest, code, arch)
        for n in notes:
            print(f"kiln: {n}", file=sys.stderr)
        _STATE.setdefault("kernels_from", []).append("artifact" if data is not None else "cache or nvcc")
        if data is not None:
            return data
    return compile_source(code, arch)


def prepare(manifest: dict, path: str | None = None, index: int = 0):
    """Check GPU `index` against the artifact and install the compile callback (which prefers the fatbins
    stored in the artifact at `path`); returns the TVM device."""
    import tvm
    import tvm_ffi

    _load_cuda_runtime(tvm)
    t = manifest.get("target", {})
    arch, want = t.get("arch", "?"), t.get("compute_capability")
    dev = tvm.cuda(index)
    if not dev.exist and index == 0:
        raise ArtifactError(
            f"artifact was built for target 'cuda' ({arch}) but no CUDA GPU is visible here: "
            "run it on a machine with an NVIDIA GPU, or rebuild with --target cpu"
        )
    if not dev.exist:
        raise ArtifactError(
            f"rank {index} of this tensor-parallel artifact runs on GPU {index}, which is not visible here: run it "
            "where there are as many GPUs as ranks (CUDA_VISIBLE_DEVICES lists them), or rebuild with fewer ranks"
        )
    have = str(dev.compute_version)
    if want and have != want:
        raise ArtifactError(
            f"artifact was built for {arch} (compute capability {want}) but this GPU "
            f"({dev.device_name}) is compute capability {have}: rebuild with "
            f"--cuda-arch sm_{have.replace('.', '')}"
        )

    def _compile(code, *_):
        return kernel_binary(str(code), arch, path, manifest)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile, override=True)
    _register_gemm(dev)
    return dev


# -- tensor-core GEMMs through cuBLAS (the library's `kiln.cuda.gemm_*` calls) ----------------------


def _find_lib(env: str, names: tuple[str, ...]) -> ctypes.CDLL | None:
    import glob

    cands = [os.environ.get(env)] if os.environ.get(env) else []
    cands += list(names)
    for d in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"):
        cands += sorted(glob.glob(os.path.join(d, names[0].split(".so")[0] + ".so*")))
    for c in cands:
        try:
            return ctypes.CDLL(c, ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    return None


class _Cublas:
    OP_N, OP_T, R_16F, R_32F, COMPUTE_32F, ALGO_DEFAULT = 0, 1, 2, 0, 68, -1

    def __init__(self, dev) -> None:
        lib = _find_lib("KILN_CUBLAS", ("libcublas.so.13", "libcublas.so.12", "libcublas.so"))
        if lib is None:
            raise ArtifactError(
                "this cuda artifact runs its GEMMs through cuBLAS, which was not found: install the "
                "CUDA toolkit's libcublas (or set KILN_CUBLAS to it), or rebuild with "
                "target_options={'gemm': 'tvm'}"
            )
        self.lib, self.dev = lib, dev
        self.handle = ctypes.c_void_p()
        if lib.cublasCreate_v2(ctypes.byref(self.handle)):
            raise ArtifactError("cublasCreate failed: is the GPU usable?")
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._one, self._zero = ctypes.byref(self.one), ctypes.byref(self.zero)
        self._stream: int | None = None  # the stream cuBLAS was last set to
        self._args: dict = {}  # per (shapes, nt): the call's integer arguments
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)
        lib.cublasGemmStridedBatchedEx.argtypes = [
            p,
            i,
            i,
            i,
            i,
            i,
            f,
            p,
            i,
            i,
            ctypes.c_longlong,
            p,
            i,
            i,
            ctypes.c_longlong,
            f,
            p,
            i,
            i,
            ctypes.c_longlong,
            i,
            i,
            i,
        ]
        lib.cublasSetStream_v2.argtypes = [p, p]

    def _gemm(self, a, b, c, nt: bool) -> None:
        """Row-major c[batch, m, n] = a[batch, m, k] @ (b[batch, n, k]^T if nt else b[batch, k, n]).
        b may have no batch dims (a weight shared by every row). Prefill calls this ~130 times a prompt from
        Python, so everything but the pointers is worked out once per shape (a call costs ~36 us otherwise)."""
        import tvm_ffi

        stream = tvm_ffi.get_raw_stream(self.dev)
        if stream != self._stream:
            self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream))
            self._stream = stream
        key = (a.shape, b.shape, c.shape, nt)
        args = self._args.get(key)
        if args is None:
            args = self._args[key] = self._shape_args(a.shape, b.shape, c.shape, nt)
        op, n, m, k, ldb, sb, sa, sc, batch = args
        err = self.lib.cublasGemmStridedBatchedEx(
            self.handle, op, self.OP_N, n, m, k, self._one,
            ctypes.c_void_p(b.data_ptr()), self.R_16F, ldb, sb,
            ctypes.c_void_p(a.data_ptr()), self.R_16F, k, sa, self._zero,
            ctypes.c_void_p(c.data_ptr()), self.R_32F, n, sc, batch,
            self.COMPUTE_32F, self.ALGO_DEFAULT,
        )  # fmt: skip
        if err:
            raise RuntimeError(f"cublasGemmStridedBatchedEx failed with status {err} for {a.shape} x {b.shape}")

    def _shape_args(self, a_shape, b_shape, c_shape, nt: bool) -> tuple:
        ash, bsh, csh = [int(x) for x in a_shape], [int(x) for x in b_shape], [int(x) for x in c_shape]
        m, n = csh[-2], csh[-1]
        k = ash[-1]
        batch = 1
        for d in csh[:-2]:
            batch *= d
        if len(bsh) == 2:  # weight: fold the batch into m
            m, batch = m * batch, 1
        sb = 0 if len(bsh) == 2 else bsh[-1] * bsh[-2]
        # column-major view: c^T[n, m] = op(b) [n, k] @ a^T [k, m]
        return (self.OP_T if nt else self.OP_N, n, m, k, k if nt else n, sb, m * k, m * n, batch)


def _register_gemm(dev) -> None:
    if "cublas" in _STATE:
        return
    import tvm_ffi

    _STATE["cublas"] = None

    def blas():
        if _STATE["cublas"] is None:
            _STATE["cublas"] = _Cublas(dev)
        return _STATE["cublas"]

    tvm_ffi.register_global_func("kiln.cuda.gemm_nt", lambda a, b, c: blas()._gemm(a, b, c, True), override=True)
    tvm_ffi.register_global_func("kiln.cuda.gemm_nn", lambda a, b, c: blas()._gemm(a, b, c, False), override=True)


# -- decode steps replayed as CUDA graphs ----------------------------------------------------------


def set_device(index: int) -> None:
    """Make GPU `index` the calling thread's current device (cuBLAS and NCCL bind to it when created)."""
    rt = _STATE.get("cudart") or _STATE.setdefault("cudart", _Cudart())
    rt.check(rt.lib.cudaSetDevice(int(index)), f"cudaSetDevice({index})")


def peer_access(index: int, peer: int) -> bool:
    """Whether GPU `index` can read GPU `peer`'s memory directly (NVLink or PCIe peer-to-peer)."""
    rt = _STATE.get("cudart") or _STATE.setdefault("cudart", _Cudart())
    ok = ctypes.c_int(0)
    rt.check(rt.lib.cudaDeviceCanAccessPeer(ctypes.byref(ok), int(index), int(peer)), "cudaDeviceCanAccessPeer")
    return bool(ok.value)


class _Cudart:
    def __init__(self) -> None:
        lib = _find_lib("KILN_CUDART", ("libcudart.so.13", "libcudart.so.12", "libcudart.so"))
        if lib is None:
            raise RuntimeError("libcudart not found")
        self.lib = lib
        p = ctypes.c_void_p
        lib.cudaStreamBeginCapture.argtypes = [p, ctypes.c_int]
        lib.cudaStreamEndCapture.argtypes = [p, ctypes.POINTER(p)]
        lib.cudaGraphInstantiate.argtypes = [ctypes.POINTER(p), p, ctypes.c_ulonglong]
        lib.cudaGraphLaunch.argtypes = [p, p]
        lib.cudaStreamSynchronize.argtypes = [p]
        lib.cudaGraphExecDestroy.argtypes = [p]
        lib.cudaGraphDestroy.argtypes = [p]

    def check(self, err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"{what} failed with CUDA error {err}")


class GraphRunner:
    """Runs one entry point at fixed shapes as a captured CUDA graph: inputs are copied into tensors
    the graph owns, the kernels replay with one launch, and the output tensor is the graph's.

    Captured once per (entry point, batch); the caches and weights are the engine's own tensors, so
    a replay updates the same paged cache a plain call would."""

    def __init__(self, engine) -> None:
        self.eng = engine
        self.rt = _Cudart()
        self.stream = engine.device.create_raw_stream()
        self.graphs: dict = {}

    def run(
        self,
        fn: str,
        arrays: list,
        then: tuple[str, list] | None = None,
        while_running: Callable[[], None] | None = None,
    ) -> tuple[Any, Any]:
        """Replay `fn` on `arrays`; with `then` = (function, more arrays), that function on `fn`'s output and
        those arrays in the same graph (the decode step's draws); `while_running()` runs on the host between
        the launch and the wait. Returns the graph's output tensors (TVM runtime tensors): `fn`'s, and `then`'s
        or None."""
        import numpy as np
        import tvm_ffi

        extra = then[1] if then is not None else []
        key = (fn,) + tuple(a.shape for a in arrays) + ((then[0],) + tuple(a.shape for a in extra) if then else ())
        g = self.graphs.get(key)
        eng = self.eng
        if g is None:
            ins = [eng._t(np.ascontiguousarray(a)) for a in list(arrays) + list(extra)]

            def step():
                out = eng.vm[fn](*ins[: len(arrays)], eng.caches, eng.weights)
                return out, (eng.vm[then[0]](out, *ins[len(arrays) :]) if then is not None else None)

            with tvm_ffi.use_raw_stream(eng.device, self.stream):
                for _ in range(2):  # warm the allocator so the captured run allocates nothing new
                    step()
                self.rt.check(self.rt.lib.cudaStreamSynchronize(ctypes.c_void_p(self.stream)), "sync")
                self.rt.check(self.rt.lib.cudaStreamBeginCapture(ctypes.c_void_p(self.stream), 2), "begin capture")
                outs = step()
                graph = ctypes.c_void_p()
                self.rt.check(
                    self.rt.lib.cudaStreamEndCapture(ctypes.c_void_p(self.stream), ctypes.byref(graph)), "end capture"
                )
            exe = ctypes.c_void_p()
            self.rt.check(self.rt.lib.cudaGraphInstantiate(ctypes.byref(exe), graph, 0), "graph instantiate")
            g = self.graphs[key] = (exe, ins, outs, graph)
        exe, ins, outs, _ = g
        for t, a in zip(ins, list(arrays) + list(extra)):
            t.copyfrom(np.ascontiguousarray(a))
        self.rt.check(self.rt.lib.cudaGraphLaunch(exe, ctypes.c_void_p(self.stream)), "graph launch")
        try:
            if while_running is not None:
                while_running()
        finally:
            self.rt.check(self.rt.lib.cudaStreamSynchronize(ctypes.c_void_p(self.stream)), "sync")
        return outs

    def close(self) -> None:
        """Destroy the captured graphs (their executables hold device memory) and the stream."""
        for exe, _, _, graph in self.graphs.values():
            self.rt.lib.cudaGraphExecDestroy(exe)
            self.rt.lib.cudaGraphDestroy(graph)
        self.graphs.clear()
        if self.stream is not None:
            self.eng.device.free_raw_stream(self.stream)
            self.stream = None
