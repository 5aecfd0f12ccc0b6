"""Fused attention for prefill and verify on the `cuda` target: tensor-core flash attention over the paged
KV cache.

Why: prefill attention went through two batched GEMMs around an fp32 softmax of the whole tokens x context
score matrix, after a copy of every page of the sequence into a contiguous K/V tensor; the score matrix
alone is 10 bytes per (query row, key) pair and the softmax reads and writes it twice. Here one kernel
streams K/V tiles straight from the pages into shared memory and keeps scores, the running softmax and
the output in registers (online softmax, FlashAttention-2's order of work: Dao 2023, arXiv:2307.08691).

Work split: a block of 4 warps owns 128 query rows of one KV head; rows are (token, head of the group)
pairs, so the query heads that share a KV head (GQA/MQA) read each K/V tile once. A warp owns 32 rows (two
`mma.sync.m16n8k16` row tiles), so every K or V fragment it reads from shared memory (ldmatrix) feeds two
mma's: with 16 rows a warp, shared-memory bandwidth (128 B/clock an SM) capped the two products near 16
FLOP a byte. Q is staged once in shared memory as fp16 and read per k-step (registers hold O, 64 fp32 a
thread at head_dim 128, and S). For each tile of 64 keys a warp computes S = Q K^T (fp16 x fp16 -> fp32) in
steps of 32 keys at head_dim 128 (64 at 64: at 128 a whole tile's S does not fit the 255 registers next to
O), masks by position (causal, and the sliding window) only where some row of the warp needs it, updates
the running max and sum in the log2 domain, and adds P V with P taken from the S accumulators (the C
fragment of two n-tiles is the A fragment of one k-tile). K and V tiles arrive by `cp.async` with a
16-byte-chunk XOR swizzle (ldmatrix reads 8 rows of one chunk column without bank conflicts) into two
stages: the next tile's copy is in flight during the whole of this one, one barrier a tile. Shared memory
is dynamic (96.5 KB at head_dim 128, over the 48 KB of static arrays): 2 blocks an SM on sm_90, 1 on sm_80
(164 KB) and sm_86/89 (100 KB).

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

BM = 128  # query rows per block (4 warps of 32); kiln_fa_bm in the device code
BN = 64  # keys per tile; kiln_fa_bn
THREADS = 128
HEAD_DIMS = (64, 128)


def smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of one block, as kiln_fa_smem_bytes lays it out: Q, two stages of K and V (fp16),
    per-warp key limits and the rows' positions; the launch must give exactly this much (the emulator test
    checks the device code stays inside it)."""
    return (BM + 4 * BN) * head_dim * 2 + (8 + BM) * 4


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
__device__ __forceinline__ void kiln_fa_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
__device__ __forceinline__ unsigned kiln_fa_h2(float lo, float hi) {
  half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
// 2^x in one MUFU instruction (exp2f without fast math adds range fix-ups); 2^-inf = 0
__device__ __forceinline__ float kiln_fa_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
// 8 fp32 (16-byte aligned) -> 8 fp16 in shared memory
__device__ __forceinline__ void kiln_fa_q8(half* dst, const float* src) {
  const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
  *reinterpret_cast<uint4*>(dst) =
      make_uint4(kiln_fa_h2(a.x, a.y), kiln_fa_h2(a.z, a.w), kiln_fa_h2(b.x, b.y), kiln_fa_h2(b.z, b.w));
}
__device__ __forceinline__ void kiln_fa_zero8(half* dst) { *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0); }
#endif

// Shared memory (dynamic, kiln_fa_smem_bytes(D)): Q (BM x D), then two stages of K and of V (BN x D each),
// all fp16 with 16-byte chunk c of row r stored at chunk c ^ (r % 8) (ldmatrix reads 8 rows of one chunk
// column without bank conflicts), then ints: per-warp key limits (8) and the positions of the block's rows.
// Registers are the scarce resource (O alone takes 128 a thread at head_dim 128): what the inner loop reads
// rarely lives in shared memory.
constexpr int kiln_fa_bm = 128, kiln_fa_bn = 64;
constexpr int kiln_fa_smem_bytes(int d) { return (kiln_fa_bm + 4 * kiln_fa_bn) * d * 2 + (8 + kiln_fa_bm) * 4; }

// o[B, H, T, D] = softmax(q k^T * scale, masked by position) v, one block per 128 (token, head-of-group)
// rows of one KV head. q: [B, H, T, D] fp32; cache: [pages, 2, KVH, PAGE, D] fp16; pt: [B, MP] page table;
// pos: [B, T] positions (negative: padding). scale_log2: the softmax scale times log2(e).
template <int D, int REP, int KVH, int PAGE, int WINDOW>
__device__ __forceinline__ void kiln_flash(const float* __restrict__ q, const half* __restrict__ cache,
                                           const int* __restrict__ pt, const int* __restrict__ pos,
                                           float* __restrict__ o, long long T, long long MP, float scale_log2,
                                           int block, int by, half* smem) {
  // MT: m16 tiles a warp owns (32 rows): every K/V fragment read from shared memory feeds MT mma's
  constexpr int BM = kiln_fa_bm, BN = kiln_fa_bn, NW = 4, MT = 2, CH = D / 8, SW = CH < 8 ? CH : 8;
  constexpr int SN = D > 64 ? 32 : BN, KT = D / 16, ND = D / 8, NB = SN / 8;
  static_assert(SW == 8 && D % 64 == 0, "the swizzle and the ldmatrix offsets below take 8 chunks a row or more");
  half* const sq = smem;                // [BM, D]
  half* const sk = smem + BM * D;       // [2, BN, D]
  half* const sv = sk + 2 * BN * D;     // [2, BN, D]
  int* const lim = reinterpret_cast<int*>(sv + 2 * BN * D);  // [2, NW]: each warp's largest, smallest position
  int* const sp = lim + 2 * NW;                               // [BM]: each row's position (-1: none)
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const long long b = by / KVH;
  const int hk = by % KVH;
  const long long rows = (long long)REP * T;
  // the launch's first blocks take the last rows: under a causal mask those see the most keys, so the long
  // blocks start first and the short ones fill the last wave (the grid is ceil(rows / BM) blocks wide)
  const long long bx = (rows + BM - 1) / BM - 1 - block;
  // row r of the block is token r / REP, head hk * REP + r % REP
  auto qrow = [&](long long r) { return ((b * (KVH * REP) + hk * REP + r % REP) * T + r / REP) * D; };

  // Q to shared memory as fp16; rows past the end or of padding are zeros (their scores stay finite)
  #pragma unroll 4
  for (int k = 0; k < BM * CH / (NW * 32); ++k) {  // a constant trip count, so that the loop unrolls
    const int i = tid + k * NW * 32, r = i / CH, c = i % CH;
    const long long row = (long long)bx * BM + r;
    half* dst = sq + r * D + (c ^ (r % SW)) * 8;
    if (row < rows && pos[b * T + row / REP] >= 0)
      kiln_fa_q8(dst, q + qrow(row) + c * 8);
    else
      kiln_fa_zero8(dst);
  }

  // this warp's rows: warp * 32 + lane
  {
    const long long r = (long long)bx * BM + warp * 32 + lane;
    const int p = r < rows ? pos[b * T + r / REP] : -1;
    sp[warp * 32 + lane] = p;
    int top = p, bottom = p < 0 ? 0x7fffffff : p;  // over the warp's rows with a position: largest, smallest
    #pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
      const int a = __shfl_xor_sync(0xffffffffu, top, s), c = __shfl_xor_sync(0xffffffffu, bottom, s);
      top = a > top ? a : top;
      bottom = c < bottom ? c : bottom;
    }
    if (lane == 0) {
      lim[warp] = top;
      lim[NW + warp] = bottom;
    }
  }
  __syncthreads();  // limits, positions and Q are in shared memory
  // the keys the block needs: [first, hi]
  int hi = lim[0], lo = lim[NW];
  #pragma unroll
  for (int w = 1; w < NW; ++w) {
    hi = lim[w] > hi ? lim[w] : hi;
    lo = lim[NW + w] < lo ? lim[NW + w] : lo;
  }
  const int first = (WINDOW > 0 && hi >= 0 && lo - WINDOW + 1 > 0) ? lo - WINDOW + 1 : 0;

  // keys k0.. of K and V into stage st, as one cp.async group; keys past hi read as zeros (and are masked)
  const int* const ptb = pt + b * MP;  // this sequence's pages
  auto load = [&](int st, int k0) {
    // the block's threads cover RP rows of 16-byte chunks a pass: this thread chunk c of rows r0 + k RP
    constexpr int RP = NW * 32 / CH;
    const int r0 = tid / CH, c = tid % CH;
    #pragma unroll
    for (int k = 0; k < BN / RP; ++k) {
      const int r = r0 + k * RP, j = k0 + r;
      // k0 is a multiple of BN. When PAGE divides BN and RP divides PAGE, row r of the tile is in its page
      // k RP / PAGE (a constant of the unrolled loop: the loads of one page are one load, all in flight at once)
      // at slot k RP % PAGE + r0; when PAGE only divides BN, in page r / PAGE at slot r % PAGE.
      constexpr bool whole = BN % PAGE == 0, aligned = whole && PAGE % RP == 0;
      const int e = aligned ? k * RP / PAGE : whole ? r / PAGE : j / PAGE - k0 / PAGE;
      const int slot = aligned ? k * RP % PAGE + r0 : whole ? r % PAGE : j % PAGE;
      // the entry is read whether or not the key is needed (clamped to hi's page, which exists), so that the
      // reads of one page stay one read; keys past hi are not copied (zeros, and masked)
      const int pi = k0 / PAGE + e;
      const long long pg = ptb[pi < hi / PAGE ? pi : hi / PAGE];
      const half* src = cache + ((pg * 2 * KVH + hk) * PAGE + slot) * D + c * 8;
      const int at = st * BN * D + r * D + (c ^ (r0 % SW)) * 8;  // r % 8 == r0 % 8: RP is a multiple of 8
      kiln_fa_cp16(sk + at, j <= hi ? src : cache, j <= hi);
      kiln_fa_cp16(sv + at, j <= hi ? src + KVH * PAGE * D : cache, j <= hi);  // V: the next [2] slot
    }
    kiln_fa_commit();
  };

  float acc[MT][ND][4];
  #pragma unroll
  for (int i = 0; i < MT; ++i)
    #pragma unroll
    for (int n = 0; n < ND; ++n) acc[i][n][0] = acc[i][n][1] = acc[i][n][2] = acc[i][n][3] = 0.f;
  float m[MT][2], l[MT][2];  // running max (scaled, log2 domain) and this lane's part of the running sum
  #pragma unroll
  for (int i = 0; i < MT; ++i) m[i][0] = m[i][1] = -INFINITY, l[i][0] = l[i][1] = 0.f;

  // ldmatrix rows: every fragment below reads rows r with r % 8 == lane % 8 and chunks 2kt + bit (or n + bit), so
  // element offset r * D + (chunk ^ (r % 8)) * 8 is a row part OR (a lane part XOR a constant of the unrolled
  // loop): one instruction a k-step where the generic form took about five
  const int x8 = lane & 7;
  const int qr = (warp * 32 + (lane & 15)) * D, qx = ((lane >> 4) ^ x8) * 8;          // Q: A fragments
  const int kr = ((lane & 7) + (lane >> 4) * 8) * D, kx = (((lane >> 3) & 1) ^ x8) * 8;  // K: B, 2 n-tiles
  const int vr = ((lane & 7) + ((lane >> 3) & 1) * 8) * D, vx = ((lane >> 4) ^ x8) * 8;  // V: B, transposed

  const int tile0 = first / BN * BN;
  if (tile0 <= hi) load(0, tile0);
  for (int k0 = tile0, st = 0; k0 <= hi; k0 += BN, st ^= 1) {
    kiln_fa_wait_all();  // this tile landed (it was issued one tile ago)
    __syncthreads();     // ... for every thread, and every warp is done with the other stage
    if (k0 + BN <= hi) load(st ^ 1, k0 + BN);  // the next tile: in flight during this one
    // the tile in SN-key steps, each with its own softmax update: S of one step in registers (SN / 2 a thread)
    #pragma unroll
    for (int hh = 0; hh < BN / SN; ++hh) {
      // a warp whose rows see none of these keys skips them (causal: the diagonal's later warps)
      const int mx = lim[warp], mn = lim[NW + warp];  // the warp's largest and smallest position
      const int j0 = k0 + hh * SN;
      if (j0 > mx || (WINDOW > 0 && j0 + SN - 1 <= mn - WINDOW)) continue;
      const half* ktile = sk + (st * BN + hh * SN) * D;
      const half* vtile = sv + (st * BN + hh * SN) * D;
      float s[MT][NB][4];
      #pragma unroll
      for (int i = 0; i < MT; ++i)
        #pragma unroll
        for (int n = 0; n < NB; ++n) s[i][n][0] = s[i][n][1] = s[i][n][2] = s[i][n][3] = 0.f;
      #pragma unroll
      for (int kt = 0; kt < KT; ++kt) {
        // Q of k-step kt as A fragments: matrices rows 0-7 / 8-15 x columns 16kt + 0-7, then + 8-15
        unsigned qa[MT][4];
        #pragma unroll
        for (int i = 0; i < MT; ++i) kiln_fa_ldsm4(qa[i], sq + i * 16 * D + (qr | (qx ^ kt * 16)));
        #pragma unroll
        for (int n = 0; n < NB; n += 2) {
          // matrices: keys 8n.. x columns 16kt + 0-7 / 8-15, then keys 8(n+1)..: B fragments of n, n+1
          unsigned bk[4];
          kiln_fa_ldsm4(bk, ktile + n * 8 * D + (kr | (kx ^ kt * 16)));
          #pragma unroll
          for (int i = 0; i < MT; ++i) {
            kiln_fa_mma(s[i][n], qa[i], bk);
            kiln_fa_mma(s[i][n + 1], qa[i], bk + 2);
          }
        }
      }
      // mask: c0, c1 at (row g, keys 2t, 2t+1), c2, c3 at (row g+8, same keys); a step every row of the warp
      // sees whole (all but the diagonal's and the window's edge) needs none
      if (j0 + SN - 1 > mn || (WINDOW > 0 && j0 <= mx - WINDOW)) {
        #pragma unroll
        for (int i = 0; i < MT; ++i)
          #pragma unroll
          for (int n = 0; n < NB; ++n)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
              // this lane's rows: g and g + 8 of m-tile i
              const int j = j0 + n * 8 + 2 * t + (e & 1), pe = sp[warp * 32 + i * 16 + (e >> 1) * 8 + g];
              if (!(j <= pe && (WINDOW == 0 || j > pe - WINDOW))) s[i][n][e] = -INFINITY;
            }
      }
      // the rows' new max (scaled, log2 domain): x[i][h] for rows g + 8h of m-tile i
      float x[MT][2];
      bool grew = false;
      #pragma unroll
      for (int i = 0; i < MT; ++i)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          float y = -INFINITY;
          #pragma unroll
          for (int n = 0; n < NB; ++n) y = fmaxf(y, fmaxf(s[i][n][2 * h], s[i][n][2 * h + 1]));
          y = fmaxf(y, __shfl_xor_sync(0xffffffffu, y, 1));
          y = fmaxf(y, __shfl_xor_sync(0xffffffffu, y, 2));
          x[i][h] = fmaxf(m[i][h], y * scale_log2);
          grew = grew || x[i][h] != m[i][h];
        }
      // past the first tiles a row's max rarely grows: the warp rescales O (MT x ND x 4 multiplies a thread)
      // only when one of its rows' did
      if (__any_sync(0xffffffffu, grew)) {
        #pragma unroll
        for (int i = 0; i < MT; ++i)
          #pragma unroll
          for (int h = 0; h < 2; ++h) {
            // a row with no visible key yet keeps max -inf (and O and l at 0): its factor is 2^-inf = 0
            const float c = kiln_fa_exp2(m[i][h] - (x[i][h] == -INFINITY ? 0.f : x[i][h]));
            l[i][h] *= c;
            #pragma unroll
            for (int n = 0; n < ND; ++n) {
              acc[i][n][2 * h] *= c;
              acc[i][n][2 * h + 1] *= c;
            }
          }
      }
      unsigned pa[MT][NB / 2][4];  // P as fp16 A fragments: keys 16kk.. = the C fragments of n-tiles 2kk, 2kk+1
      #pragma unroll
      for (int i = 0; i < MT; ++i) {
        m[i][0] = x[i][0];
        m[i][1] = x[i][1];
        // a row with no visible key yet: subtract 0 so every exp2 below is 0, never NaN
        const float u0 = x[i][0] == -INFINITY ? 0.f : x[i][0], u1 = x[i][1] == -INFINITY ? 0.f : x[i][1];
        #pragma unroll
        for (int n = 0; n < NB; ++n) {
          const float e0 = kiln_fa_exp2(fmaf(s[i][n][0], scale_log2, -u0));
          const float e1 = kiln_fa_exp2(fmaf(s[i][n][1], scale_log2, -u0));
          const float e2 = kiln_fa_exp2(fmaf(s[i][n][2], scale_log2, -u1));
          const float e3 = kiln_fa_exp2(fmaf(s[i][n][3], scale_log2, -u1));
          l[i][0] += e0 + e1;
          l[i][1] += e2 + e3;
          pa[i][n / 2][(n & 1) * 2] = kiln_fa_h2(e0, e1);
          pa[i][n / 2][(n & 1) * 2 + 1] = kiln_fa_h2(e2, e3);
        }
      }
      #pragma unroll
      for (int kk = 0; kk < NB / 2; ++kk) {
        #pragma unroll
        for (int n = 0; n < ND; n += 2) {
          // matrices (transposed): keys 16kk + 0-7 / 8-15 x columns 8n.., then 8(n+1)..: B fragments of n, n+1
          unsigned bv[4];
          kiln_fa_ldsm4t(bv, vtile + kk * 16 * D + (vr | (vx ^ n * 8)));
          #pragma unroll
          for (int i = 0; i < MT; ++i) {
            kiln_fa_mma(acc[i][n], pa[i][kk], bv);
            kiln_fa_mma(acc[i][n + 1], pa[i][kk], bv + 2);
          }
        }
      }
    }
  }
  #pragma unroll
  for (int i = 0; i < MT; ++i)
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = l[i][h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inv = sp[warp * 32 + i * 16 + h * 8 + g] >= 0 && sum > 0.f ? 1.f / sum : 0.f;
      const long long r = (long long)bx * BM + warp * 32 + i * 16 + h * 8 + g;
      if (r >= rows) continue;
      float* out = o + qrow(r);
      #pragma unroll
      for (int n = 0; n < ND; ++n) {
        out[n * 8 + 2 * t] = acc[i][n][2 * h] * inv;
        out[n * 8 + 2 * t + 1] = acc[i][n][2 * h + 1] * inv;
      }
    }
}
#endif
"""


def supported(head_dim: int) -> bool:
    """Whether the fused kernel takes this head size (fragments cover 16 columns; shared memory and registers
    are sized for 64 and 128)."""
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
    smem = smem_bytes(head_dim) // 2

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
                    # dynamic shared memory: over the 48 KB of static arrays; the whole extent is named so that
                    # TVM launches the kernel with all of it (and opts in to more than 48 KB)
                    sm = T.alloc_buffer((smem,), "float16", scope="shared.dyn")
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
                        T.tvm_access_ptr(T.type_annotation("float16"), sm.data, 0, smem, 3),
                        source_code=SRC,
                    )

    return flash
