"""Fused attention for prefill and verify on the `cuda` target: tensor-core flash attention over the paged
KV cache.

Why: prefill attention went through two batched GEMMs around an fp32 softmax of the whole tokens x context
score matrix, after a copy of every page of the sequence into a contiguous K/V tensor; the score matrix
alone is 10 bytes per (query row, key) pair and the softmax reads and writes it twice. Here one kernel
streams K/V tiles straight from the pages into shared memory and keeps scores, the running softmax and
the output in registers (online softmax, FlashAttention-2's order of work: Dao 2023, arXiv:2307.08691).

Work split: a block of 4 warps owns 64 query rows of one KV head; rows are (token, head of the group)
pairs, so the query heads that share a KV head (GQA/MQA) read each K/V tile once. A warp owns 16 rows:
its queries live in registers as `mma.sync.m16n8k16` A fragments for the whole kernel; for each tile of
64 keys it computes S = Q K^T (fp16 x fp16 -> fp32), masks by position (causal, and the sliding window),
updates the running max and sum in the log2 domain, and adds P V with P taken from the S accumulators
(the C fragment of two n-tiles is the A fragment of one k-tile). K and V tiles arrive by `cp.async` with
a 16-byte-chunk XOR swizzle (ldmatrix reads 8 rows of one chunk column without bank conflicts); V's copy
overlaps the S step and the next K's the P V step, as in FlashAttention-2's one-stage pipeline.

Masking reads each row's own position, so the same kernel serves a whole prompt, a chunk of one appended
to pages already cached (chunked prefill, prefix reuse), and a verify step's k+1 tokens. Rows whose
position is negative (padding) produce zeros.

The device code is plain CUDA carried in the kernel's source (`T.cuda.func_call`); the instruction
wrappers (`mma`, `ldmatrix`, `cp.async`) sit in one section so that tests/cuda_emu.h can replace them
with a CPU emulation of a warp and check the kernel's index arithmetic without a GPU.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

BM = 64  # query rows per block (4 warps of 16)
BN = 64  # keys per tile
THREADS = 128
HEAD_DIMS = (64, 128)  # shared memory: K and V tiles of BN x head_dim fp16 (32 KB at 128)

SRC = r"""
#ifndef KILN_FLASH
#define KILN_FLASH
#ifndef KILN_EMU
__device__ __forceinline__ void kiln_fa_mma(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// four 8x8 fp16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i
__device__ __forceinline__ void kiln_fa_ldsm4(unsigned* r, const half* row) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void kiln_fa_ldsm4t(unsigned* r, const half* row) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// 16 bytes global -> shared, asynchronously; zeros when !valid (no bytes are read)
__device__ __forceinline__ void kiln_fa_cp16(half* dst, const half* src, bool valid) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void kiln_fa_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void kiln_fa_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ unsigned kiln_fa_h2(float lo, float hi) {
  half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
#endif

// o[B, H, T, D] = softmax(q k^T * scale, masked by position) v, one block per 64 (token, head-of-group)
// rows of one KV head. q: [B, H, T, D] fp32; cache: [pages, 2, KVH, PAGE, D] fp16; pt: [B, MP] page table;
// pos: [B, T] positions (negative: padding). scale_log2: the softmax scale times log2(e).
template <int D, int REP, int KVH, int PAGE, int WINDOW>
__device__ __forceinline__ void kiln_flash(const float* __restrict__ q, const half* __restrict__ cache,
                                           const int* __restrict__ pt, const int* __restrict__ pos,
                                           float* __restrict__ o, long long T, long long MP, float scale_log2,
                                           int bx, int by) {
  constexpr int BM = 64, BN = 64, NW = 4, CH = D / 8, SW = CH < 8 ? CH : 8, KT = D / 16, ND = D / 8;
  __shared__ __align__(128) half sk[BN * D];  // K tile: row = key, 16-byte chunk c stored at c ^ (row % SW)
  __shared__ __align__(128) half sv[BN * D];
  __shared__ int lim[2 * NW];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const long long b = by / KVH;
  const int hk = by % KVH;
  const long long rows = (long long)REP * T;
  // this lane's two rows (g and g + 8 of its warp's 16): row r is token r / REP, head hk * REP + r % REP
  const long long r0 = (long long)bx * BM + warp * 16 + g, r1 = r0 + 8;
  const int p0 = r0 < rows ? pos[b * T + r0 / REP] : -1;
  const int p1 = r1 < rows ? pos[b * T + r1 / REP] : -1;
  // the keys the block needs: [first, hi]
  int mx = p0 > p1 ? p0 : p1;
  int mn = p0 < 0 ? 0x7fffffff : p0;
  if (p1 >= 0 && p1 < mn) mn = p1;
  #pragma unroll
  for (int s = 16; s > 0; s >>= 1) {
    const int a = __shfl_xor_sync(0xffffffffu, mx, s), c = __shfl_xor_sync(0xffffffffu, mn, s);
    mx = a > mx ? a : mx;
    mn = c < mn ? c : mn;
  }
  if (lane == 0) {
    lim[warp] = mx;
    lim[NW + warp] = mn;
  }
  __syncthreads();
  int hi = lim[0], lo = lim[NW];
  #pragma unroll
  for (int w = 1; w < NW; ++w) {
    hi = lim[w] > hi ? lim[w] : hi;
    lo = lim[NW + w] < lo ? lim[NW + w] : lo;
  }
  const int first = (WINDOW > 0 && hi >= 0 && lo - WINDOW + 1 > 0) ? lo - WINDOW + 1 : 0;

  // queries as A fragments: a0 (row g, cols 2t, 2t+1), a1 (row g+8, same), a2/a3 (cols + 8)
  unsigned qa[KT][4];
  {
    const float* q0 = r0 < rows ? q + ((b * (KVH * REP) + hk * REP + r0 % REP) * T + r0 / REP) * D : nullptr;
    const float* q1 = r1 < rows ? q + ((b * (KVH * REP) + hk * REP + r1 % REP) * T + r1 / REP) * D : nullptr;
    #pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const int c = kt * 16 + 2 * t;
      qa[kt][0] = q0 ? kiln_fa_h2(q0[c], q0[c + 1]) : 0u;
      qa[kt][1] = q1 ? kiln_fa_h2(q1[c], q1[c + 1]) : 0u;
      qa[kt][2] = q0 ? kiln_fa_h2(q0[c + 8], q0[c + 9]) : 0u;
      qa[kt][3] = q1 ? kiln_fa_h2(q1[c + 8], q1[c + 9]) : 0u;
    }
  }
  float acc[ND][4];
  #pragma unroll
  for (int n = 0; n < ND; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  // one K or V tile (kv 0/1) of keys k0.. into dst; keys past hi read as zeros (and are masked)
  auto load = [&](half* dst, int kv, int k0) {
    #pragma unroll
    for (int i = tid; i < BN * CH; i += NW * 32) {
      const int r = i / CH, c = i % CH, j = k0 + r;
      const half* src = cache;
      if (j <= hi) {
        const long long pg = pt[b * MP + j / PAGE];
        src = cache + (((pg * 2 + kv) * KVH + hk) * PAGE + j % PAGE) * D + c * 8;
      }
      kiln_fa_cp16(dst + r * D + (c ^ (r % SW)) * 8, src, j <= hi);
    }
    kiln_fa_commit();
  };

  const int tile0 = first / BN * BN;
  if (tile0 <= hi) load(sk, 0, tile0);
  for (int k0 = tile0; k0 <= hi; k0 += BN) {
    load(sv, 1, k0);  // V of this tile: in flight during S
    kiln_fa_wait<1>();  // K landed (V may not have)
    __syncthreads();
    float s[BN / 8][4];
    #pragma unroll
    for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    #pragma unroll
    for (int kt = 0; kt < KT; kt += 2) {
      #pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        // matrices: keys 8n..8n+7 x columns 16kt + 0-7, 8-15, 16-23, 24-31: B fragments of k-tiles kt, kt+1
        unsigned bk[4];
        const int r = n * 8 + (lane & 7), c = kt * 2 + (lane >> 3);
        kiln_fa_ldsm4(bk, sk + r * D + (c ^ (r % SW)) * 8);
        kiln_fa_mma(s[n], qa[kt], bk);
        kiln_fa_mma(s[n], qa[kt + 1], bk + 2);
      }
    }
    // scale and mask: c0, c1 at (row g, keys 2t, 2t+1), c2, c3 at (row g+8, same keys)
    float x0 = m0, x1 = m1;
    #pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = k0 + n * 8 + 2 * t + (e & 1), p = e < 2 ? p0 : p1;
        const bool ok = j <= p && (WINDOW == 0 || j > p - WINDOW);
        s[n][e] = ok ? s[n][e] * scale_log2 : -INFINITY;
      }
      x0 = fmaxf(x0, fmaxf(s[n][0], s[n][1]));
      x1 = fmaxf(x1, fmaxf(s[n][2], s[n][3]));
    }
    x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 1));
    x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 2));
    x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 1));
    x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 2));
    // a row with no visible key yet keeps max -inf: subtract 0 so every exp2 below is 0, never NaN
    const float u0 = x0 == -INFINITY ? 0.f : x0, u1 = x1 == -INFINITY ? 0.f : x1;
    const float c0 = exp2f(m0 - u0), c1 = exp2f(m1 - u1);
    m0 = x0;
    m1 = x1;
    l0 *= c0;
    l1 *= c1;
    #pragma unroll
    for (int n = 0; n < ND; ++n) {
      acc[n][0] *= c0;
      acc[n][1] *= c0;
      acc[n][2] *= c1;
      acc[n][3] *= c1;
    }
    #pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
      s[n][0] = exp2f(s[n][0] - u0);
      s[n][1] = exp2f(s[n][1] - u0);
      s[n][2] = exp2f(s[n][2] - u1);
      s[n][3] = exp2f(s[n][3] - u1);
      l0 += s[n][0] + s[n][1];
      l1 += s[n][2] + s[n][3];
    }
    kiln_fa_wait<0>();  // V landed
    __syncthreads();    // ... for every thread, and no warp reads K any more
    if (k0 + BN <= hi) load(sk, 0, k0 + BN);  // the next K: in flight during P V
    #pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      // P of keys 16kk..16kk+15 as an A fragment: the C fragments of n-tiles 2kk and 2kk+1
      const unsigned pa[4] = {kiln_fa_h2(s[2 * kk][0], s[2 * kk][1]), kiln_fa_h2(s[2 * kk][2], s[2 * kk][3]),
                              kiln_fa_h2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              kiln_fa_h2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      #pragma unroll
      for (int n = 0; n < ND; n += 2) {
        // matrices (transposed): keys 16kk + 0-7 / 8-15 x columns 8n.., then 8(n+1)..: B fragments of n, n+1
        unsigned bv[4];
        const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = n + (lane >> 4);
        kiln_fa_ldsm4t(bv, sv + r * D + (c ^ (r % SW)) * 8);
        kiln_fa_mma(acc[n], pa, bv);
        kiln_fa_mma(acc[n + 1], pa, bv + 2);
      }
    }
    __syncthreads();  // every warp is done with V before the next tile's copy into it
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float i0 = p0 >= 0 && l0 > 0.f ? 1.f / l0 : 0.f, i1 = p1 >= 0 && l1 > 0.f ? 1.f / l1 : 0.f;
  float* o0 = r0 < rows ? o + ((b * (KVH * REP) + hk * REP + r0 % REP) * T + r0 / REP) * D : nullptr;
  float* o1 = r1 < rows ? o + ((b * (KVH * REP) + hk * REP + r1 % REP) * T + r1 / REP) * D : nullptr;
  #pragma unroll
  for (int n = 0; n < ND; ++n) {
    const int c = n * 8 + 2 * t;
    if (o0) {
      o0[c] = acc[n][0] * i0;
      o0[c + 1] = acc[n][1] * i0;
    }
    if (o1) {
      o1[c] = acc[n][2] * i1;
      o1[c + 1] = acc[n][3] * i1;
    }
  }
}
#endif
"""


def supported(head_dim: int) -> bool:
    """Whether the fused kernel takes this head size (its K/V tiles must fit the static shared memory)."""
    return head_dim in HEAD_DIMS


def flash_func(heads: int, kv_heads: int, head_dim: int, page: int, scale: float, window: int = 0):
    """o[B, H, T, D] = attention of q[B, H, T, D] (fp32) over the fp16 paged cache, each row masked by its
    position (causal; the last `window` positions when window > 0)."""
    if not supported(head_dim):
        raise ValueError(f"fused prefill attention takes head_dim in {HEAD_DIMS}, got {head_dim}")
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} must be a multiple of KV heads {kv_heads}")
    rep = heads // kv_heads
    call = f"kiln_flash<{head_dim}, {rep}, {kv_heads}, {page}, {int(window)}>"
    scale_log2 = float(scale) * math.log2(math.e)

    @T.prim_func(private=True)
    def flash(var_q: T.handle, var_cache: T.handle, var_pt: T.handle, var_pos: T.handle, var_o: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        P, B, Tn, MP = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (B, heads, Tn, head_dim), "float32")
        cache = T.match_buffer(var_cache, (P, 2, kv_heads, page, head_dim), "float16")
        pt = T.match_buffer(var_pt, (B, MP), "int32")
        pos = T.match_buffer(var_pos, (B, Tn), "int32")
        o = T.match_buffer(var_o, (B, heads, Tn, head_dim), "float32")
        for by in T.thread_binding(B * kv_heads, thread="blockIdx.y"):
            for bx in T.thread_binding((rep * Tn + BM - 1) // BM, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    T.cuda.func_call(
                        call,
                        T.address_of(q[0, 0, 0, 0]),
                        T.address_of(cache[0, 0, 0, 0, 0]),
                        T.address_of(pt[0, 0]),
                        T.address_of(pos[0, 0]),
                        T.address_of(o[0, 0, 0, 0]),
                        Tn,
                        MP,
                        T.float32(scale_log2),
                        bx + tx * 0,
                        by,
                        source_code=SRC,
                    )

    return flash
