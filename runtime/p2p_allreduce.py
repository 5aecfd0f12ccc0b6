"""A one-shot all-reduce over GPU peer memory (NVLink), for the small sums of a decode step.

A decode step of a tensor-parallel model sums a few KB per layer twice (8B at batch 1: 64 sums of 16 KB);
NCCL's latency per call, not the bytes, makes their cost. Here every rank exposes one buffer to the others
(CUDA IPC handles, exchanged through NCCL once at start) and a single kernel does the sum: each block copies
its slice of the rank's input into the rank's own buffer, meets the same block of every other rank at a
flag barrier (flags written into the peers' memory, an epoch counted on the device so the kernel can be
replayed inside a CUDA graph), reads the slice from every rank's buffer over NVLink, adds in rank order
(every rank gets the same bits) and meets them again before the buffer may be reused.

The kernel and its host side are CUDA C++ compiled once per host with nvcc into a shared library (cached
with the kernel cache, runtime/cuda.py). `Nccl` (runtime/collectives.py) uses it for float32 sums up to
`CAP` bytes when every rank could set it up, and NCCL otherwise; KILN_TP_ALLREDUCE=nccl turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

CAP = 1 << 20  # bytes of one rank's buffer: decode sums up to batch 64 of an 4096-wide model
MAX_BLOCKS = 32

SOURCE = r"""
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#define MAX_RANKS 8
#define MAX_BLOCKS @MAX_BLOCKS@
#define CAP @CAP@

struct Group {
  int rank, ranks;
  float* data[MAX_RANKS];          // every rank's buffer (this rank's own at [rank])
  uint32_t* flags[MAX_RANKS];      // every rank's flags: [2][MAX_BLOCKS][MAX_RANKS]
  uint32_t* epoch;                 // this rank's count of calls, per block
  volatile int* abort;             // host-mapped: set when the group is aborted (a rank died)
};

static Group G;
static void* mine = nullptr;
static volatile int* host_abort = nullptr;
static void* peers[MAX_RANKS];

__device__ __forceinline__ void meet(const Group& g, int phase, uint32_t e) {
  // thread t < ranks tells rank t that this block has arrived, then waits for rank t's same block
  int t = threadIdx.x;
  if (t < g.ranks) {
    __threadfence_system();
    volatile uint32_t* theirs = g.flags[t] + (phase * MAX_BLOCKS + blockIdx.x) * MAX_RANKS + g.rank;
    *theirs = e;
    volatile uint32_t* own = g.flags[g.rank] + (phase * MAX_BLOCKS + blockIdx.x) * MAX_RANKS + t;
    for (int spins = 0; (int32_t)(*own - e) < 0; ++spins)
      if ((spins & 1023) == 1023 && *g.abort) break;  // a dead rank never arrives
  }
  __syncthreads();
}

__global__ void all_reduce_kernel(Group g, const float* __restrict__ x, float* __restrict__ out, int n) {
  uint32_t e = g.epoch[blockIdx.x] + 1;
  int chunk = (n + gridDim.x - 1) / gridDim.x;
  int lo = blockIdx.x * chunk, hi = min(n, lo + chunk);
  float* own = g.data[g.rank];
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) own[i] = x[i];
  __syncthreads();
  meet(g, 0, e);
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    float s = 0.f;
    for (int r = 0; r < g.ranks; ++r) s += ((volatile float*)g.data[r])[i];
    out[i] = s;
  }
  __syncthreads();
  meet(g, 1, e);
  if (threadIdx.x == 0) g.epoch[blockIdx.x] = e;
}

static size_t flag_bytes() { return sizeof(uint32_t) * (2 * MAX_BLOCKS * MAX_RANKS + MAX_BLOCKS); }

extern "C" int kiln_ar_alloc(int device, int rank, int ranks, void* handle_out) {
  if (ranks > MAX_RANKS) return -1;
  cudaError_t err = cudaSetDevice(device);
  if (err) return err;
  err = cudaMalloc(&mine, flag_bytes() + CAP);
  if (err) return err;
  err = cudaMemset(mine, 0, flag_bytes() + CAP);
  if (err) return err;
  err = cudaDeviceSynchronize();
  if (err) return err;
  int* dev_abort = nullptr;
  err = cudaHostAlloc((void**)&host_abort, sizeof(int), cudaHostAllocMapped);
  if (err) return err;
  *host_abort = 0;
  err = cudaHostGetDevicePointer((void**)&dev_abort, (void*)host_abort, 0);
  if (err) return err;
  G.abort = dev_abort;
  G.rank = rank;
  G.ranks = ranks;
  return cudaIpcGetMemHandle((cudaIpcMemHandle_t*)handle_out, mine);
}

extern "C" int kiln_ar_open(const void* handles) {
  for (int r = 0; r < G.ranks; ++r) {
    void* p = mine;
    if (r != G.rank) {
      cudaIpcMemHandle_t h;
      memcpy(&h, (const char*)handles + r * sizeof(cudaIpcMemHandle_t), sizeof(h));
      cudaError_t err = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
      if (err) return err;
      peers[r] = p;
    }
    G.flags[r] = (uint32_t*)p;
    G.data[r] = (float*)((char*)p + flag_bytes());
  }
  G.epoch = (uint32_t*)mine + 2 * MAX_BLOCKS * MAX_RANKS;
  return 0;
}

extern "C" int kiln_ar_run(const float* x, float* out, int n, void* stream) {
  if ((size_t)n * sizeof(float) > CAP) return -2;
  int blocks = (n + 2047) / 2048;
  blocks = blocks < 1 ? 1 : (blocks > MAX_BLOCKS ? MAX_BLOCKS : blocks);
  all_reduce_kernel<<<blocks, 512, 0, (cudaStream_t)stream>>>(G, x, out, n);
  return cudaGetLastError();
}

extern "C" int kiln_ar_handle_bytes() { return sizeof(cudaIpcMemHandle_t); }

extern "C" void kiln_ar_abort() { if (host_abort) *host_abort = 1; }

extern "C" void kiln_ar_close() {
  for (int r = 0; r < G.ranks; ++r)
    if (r != G.rank && peers[r]) { cudaIpcCloseMemHandle(peers[r]); peers[r] = nullptr; }
  if (mine) { cudaFree(mine); mine = nullptr; }
  if (host_abort) { cudaFreeHost((void*)host_abort); host_abort = nullptr; }
}
""".replace("@MAX_BLOCKS@", str(MAX_BLOCKS)).replace("@CAP@", str(CAP))

_LIB: dict[str, ctypes.CDLL] = {}


def library(arch: str) -> ctypes.CDLL:
    """The compiled helper for `arch` (sm_90a ...): from the kernel cache, or nvcc once."""
    if arch in _LIB:
        return _LIB[arch]
    from .cuda import cache_dir
    from .cuda_kernels import nvcc_path

    key = hashlib.sha256((arch + "\0" + SOURCE).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir(), f"allreduce-{key}.{arch}.so")
    if not os.path.exists(path):
        nvcc = nvcc_path()
        if nvcc is None:
            raise OSError("no nvcc to compile the peer-memory all-reduce")
        os.makedirs(cache_dir(), exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "ar.cu"), os.path.join(tmp, "ar.so")
            with open(src, "w") as f:
                f.write(SOURCE)
            r = subprocess.run(
                [nvcc, "-shared", "-Xcompiler", "-fPIC", "-O3", f"-arch={arch}", "-o", out, src],
                capture_output=True,
                text=True,
            )
            if r.returncode:
                raise OSError(f"nvcc failed on the peer-memory all-reduce: {r.stderr[-2000:]}")
            tmp_path = f"{path}.{os.getpid()}.tmp"
            shutil.copyfile(out, tmp_path)
            os.replace(tmp_path, path)
    lib = ctypes.CDLL(path)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.kiln_ar_alloc.argtypes = [i, i, i, p]
    lib.kiln_ar_open.argtypes = [p]
    lib.kiln_ar_run.argtypes = [p, p, i, p]
    _LIB[arch] = lib
    return lib
