"""Token draws on the GPU: a decode step returns token ids to the host, not logits.

A batch-64 decode step of a 128k-vocabulary model produces 33 MB of fp32 logits (131 MB at batch 256); copying
them to the host and taking an argmax there costs more than the step's kernels. The `sample` function of a
cuda artifact reads the last position's logits of every row on the device and writes one token id a row:

  temperature 0   the argmax (the first maximum, as numpy's argmax)
  temperature T   a Gumbel-max draw: argmax(logits / T + g), g = -log(-log(u)) with u uniform from a hash of
                  the row's key and the token id; an exact draw from softmax(logits / T) (Gumbel, 1954; the
                  "Gumbel-max trick")

The key is drawn by the host from the request's own generator each step, so a seeded request repeats on the
same engine. Everything else (penalties, top-k/top-p/min-p filters, grammars, logprobs) reads the row's
logits on the host (runtime/decoding.py decides which rows the device may draw alone).

One block of NT threads a row; each thread keeps its best (value, index) over a strided slice, then warp
shuffles and one pass through shared memory reduce them. The device code is plain CUDA carried in the
kernel's source, so tests/cuda_emu.h runs it on the CPU; tests/cuda_sample_ref.py computes the same draws
in numpy.
"""

from __future__ import annotations

from tvm.script import tirx as T

NT = 1024  # threads a row

SRC = r"""
#ifndef KILN_SAMPLE
#define KILN_SAMPLE
// a 32-bit integer mix (xorshift-multiply rounds, constants of the "lowbias32" hash)
__device__ __forceinline__ unsigned kiln_mix32(unsigned x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}
// Gumbel noise of token j in a row keyed `key`: -log(-log(u)), u uniform in (0, 1) from 24 bits of the hash
__device__ __forceinline__ float kiln_gumbel(unsigned key, unsigned j) {
  const float u = ((float)(kiln_mix32(j ^ kiln_mix32(key)) >> 8) + 0.5f) * (1.0f / 16777216.0f);
  return -logf(-logf(u));
}
// (v, i) beats (w, k): a larger value, or an equal one at a smaller index; NaN never wins
__device__ __forceinline__ bool kiln_better(float v, int i, float w, int k) { return v > w || (v == w && i < k); }

__device__ __forceinline__ void kiln_best_of_warp(float& v, int& i) {
  for (int m = 16; m > 0; m >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffU, v, m);
    const int oi = __shfl_xor_sync(0xffffffffU, i, m);
    if (kiln_better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

// tok[b] = the draw of row b from logits[b, tokens - 1, :]; temp[b] <= 0: argmax. A row whose logits are all
// -inf or NaN gives token 0 (numpy's argmax of an all -inf row).
template <int NT>
__device__ void kiln_sample(const float* logits, const float* temp, const int* key, int* tok, long long tokens,
                            int vocab, int b) {
  __shared__ float sv[NT / 32];
  __shared__ int si[NT / 32];
  const float* row = logits + ((long long)b * tokens + tokens - 1) * vocab;
  const float t = temp[b];
  const unsigned k = (unsigned)key[b];
  float best = -3.402823466e38f;
  int bi = vocab;
  if (t > 0.0f) {
    const float inv = 1.0f / t;
    for (int j = threadIdx.x; j < vocab; j += NT) {
      const float v = row[j] * inv + kiln_gumbel(k, (unsigned)j);
      if (kiln_better(v, j, best, bi)) {
        best = v;
        bi = j;
      }
    }
  } else {
    for (int j = threadIdx.x; j < vocab; j += NT) {
      const float v = row[j];
      if (kiln_better(v, j, best, bi)) {
        best = v;
        bi = j;
      }
    }
  }
  kiln_best_of_warp(best, bi);
  if ((threadIdx.x & 31) == 0) {
    sv[threadIdx.x >> 5] = best;
    si[threadIdx.x >> 5] = bi;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    best = threadIdx.x < NT / 32 ? sv[threadIdx.x] : -3.402823466e38f;
    bi = threadIdx.x < NT / 32 ? si[threadIdx.x] : vocab;
    kiln_best_of_warp(best, bi);
    if (threadIdx.x == 0) tok[b] = bi < vocab ? bi : 0;
  }
}
#endif
"""


def sample_func(vocab: int):
    """tokens[B] (int32) from logits[B, T, vocab] (fp32; the last position), temperature[B] (fp32) and key[B]
    (int32): the argmax where temperature <= 0, a Gumbel-max draw otherwise."""

    @T.prim_func(private=True)
    def sample(var_logits: T.handle, var_temp: T.handle, var_key: T.handle, var_tok: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        B, Tn = T.int64(), T.int64()
        logits = T.match_buffer(var_logits, (B, Tn, vocab), "float32")
        temp = T.match_buffer(var_temp, (B,), "float32")
        key = T.match_buffer(var_key, (B,), "int32")
        tok = T.match_buffer(var_tok, (B,), "int32")
        for b in T.thread_binding(B, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                T.cuda.func_call(
                    f"kiln_sample<{NT}>",
                    T.address_of(logits[0, 0, 0]),
                    T.address_of(temp[0]),
                    T.address_of(key[0]),
                    T.address_of(tok[0]),
                    Tn,
                    vocab,
                    T.Cast("int32", b) + T.Cast("int32", tx) * 0,
                    source_code=SRC,
                )

    return sample
