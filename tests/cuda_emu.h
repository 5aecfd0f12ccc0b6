// A CPU emulation of the few CUDA features kiln's hand-written device code uses, for tests on a machine
// without a GPU: one block at a time, each of its threads a std::thread; warp-level instructions (shuffles,
// ldmatrix, mma.sync) exchange operands through per-warp slots between barriers, so a fragment-layout or
// index mistake gives wrong numbers here as it would on the device. cp.async is a plain copy. What this
// cannot show: timing, bank conflicts, and the inline PTX itself (kept in the KILN_EMU-guarded section of
// the kernel source, replaced by the definitions below).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#define KILN_EMU 1
#define __device__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
// shared memory: one block runs at a time, so a function-level static is the block's shared memory
#define __shared__ static

typedef _Float16 half;
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;

namespace emu {
constexpr int MAXW = 32;  // warps per block at most
struct Block {
  std::barrier<>* all;
  std::barrier<>* warp[MAXW];
  unsigned long long slot[MAXW][32][8];  // per lane: operands of the current warp-level instruction
};
inline Block* blk = nullptr;
inline int lane() { return threadIdx.x & 31; }
inline int wid() { return threadIdx.x >> 5; }
inline void warp_sync() { blk->warp[wid()]->arrive_and_wait(); }
inline unsigned short bits(half h) {
  unsigned short u;
  std::memcpy(&u, &h, 2);
  return u;
}
inline half from_bits(unsigned short u) {
  half h;
  std::memcpy(&h, &u, 2);
  return h;
}
inline float lo(unsigned u) { return (float)from_bits(u & 0xffff); }
inline float hi(unsigned u) { return (float)from_bits(u >> 16); }
}  // namespace emu

inline void __syncthreads() { emu::blk->all->arrive_and_wait(); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int mask) {
  auto& s = emu::blk->slot[emu::wid()];
  std::memcpy(&s[emu::lane()][0], &v, sizeof(V));
  emu::warp_sync();
  V r;
  std::memcpy(&r, &s[emu::lane() ^ mask][0], sizeof(V));
  emu::warp_sync();
  return r;
}

inline bool __any_sync(unsigned, bool pred) {
  auto& s = emu::blk->slot[emu::wid()];
  s[emu::lane()][0] = pred;
  emu::warp_sync();
  bool any = false;
  for (int l = 0; l < 32; ++l) any = any || s[l][0];
  emu::warp_sync();
  return any;
}

inline unsigned kiln_fa_h2(float lo, float hi) {
  return (unsigned)emu::bits((half)lo) | ((unsigned)emu::bits((half)hi) << 16);
}

// mma.sync.m16n8k16.row.col f32.f16.f16.f32: lane l = 4g + t holds A (row g / g+8, cols 2t.. / 2t+8..),
// B (k 2t, 2t+1 / 2t+8, 2t+9 of column g) and C (row g / g+8, cols 2t, 2t+1)
inline void kiln_fa_mma(float* c, const unsigned* a, const unsigned* b) {
  auto& s = emu::blk->slot[emu::wid()];
  const int l = emu::lane();
  for (int i = 0; i < 4; ++i) s[l][i] = a[i];
  s[l][4] = b[0];
  s[l][5] = b[1];
  emu::warp_sync();
  float A[16][16], B[16][8];
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln >> 2, t = ln & 3;
    for (int i = 0; i < 4; ++i) {
      const unsigned u = (unsigned)s[ln][i];
      const int r = g + (i & 1) * 8, col = 2 * t + (i >> 1) * 8;
      A[r][col] = emu::lo(u);
      A[r][col + 1] = emu::hi(u);
    }
    for (int i = 0; i < 2; ++i) {
      const unsigned u = (unsigned)s[ln][4 + i];
      B[2 * t + i * 8][g] = emu::lo(u);
      B[2 * t + i * 8 + 1][g] = emu::hi(u);
    }
  }
  emu::warp_sync();
  const int g = l >> 2, t = l & 3;
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >> 1) * 8, col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][col];
    c[i] = acc;
  }
}

// ldmatrix.m8n8.x4(.trans).b16: lanes 8i..8i+7 give the 8 row addresses of matrix i; register i of lane
// l = 4g + t holds (row g, cols 2t, 2t+1) of matrix i, or with .trans (rows 2t, 2t+1 of column g)
inline void kiln_fa_ldsm(unsigned* r, const half* row, bool trans) {
  auto& s = emu::blk->slot[emu::wid()];
  const int l = emu::lane();
  s[l][0] = (unsigned long long)row;
  emu::warp_sync();
  const int g = l >> 2, t = l & 3;
  for (int i = 0; i < 4; ++i) {
    half e0, e1;
    if (!trans) {
      const half* p = (const half*)s[8 * i + g][0];
      e0 = p[2 * t];
      e1 = p[2 * t + 1];
    } else {
      e0 = ((const half*)s[8 * i + 2 * t][0])[g];
      e1 = ((const half*)s[8 * i + 2 * t + 1][0])[g];
    }
    r[i] = (unsigned)emu::bits(e0) | ((unsigned)emu::bits(e1) << 16);
  }
  emu::warp_sync();
}
inline void kiln_fa_ldsm4(unsigned* r, const half* row) { kiln_fa_ldsm(r, row, false); }
inline void kiln_fa_ldsm4t(unsigned* r, const half* row) { kiln_fa_ldsm(r, row, true); }
inline void kiln_fa_cp16(half* dst, const half* src, bool valid) {
  if (valid)
    std::memcpy(dst, src, 16);
  else
    std::memset(dst, 0, 16);
}
inline void kiln_fa_commit() {}
template <int N>
inline void kiln_fa_wait() {}
inline void kiln_fa_wait_all() {}
// ex2.approx: 2^x, and 0 for -inf
inline float kiln_fa_exp2(float x) { return std::exp2(x); }
// 8 fp32 -> 8 fp16, one 16-byte shared-memory store
inline void kiln_fa_q8(half* dst, const float* src) {
  for (int i = 0; i < 8; ++i) dst[i] = (half)src[i];
}
inline void kiln_fa_zero8(half* dst) { std::memset(dst, 0, 16); }

// n values of type X from a binary file (the drivers' inputs); exits with a message when it is short
template <typename X>
inline std::vector<X> emu_load(const std::string& path, size_t n) {
  std::vector<X> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(X), n, f) != n) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", n, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

// run `body` for every block of a grid (gx, gy) with `threads` threads each
inline void emu_launch(int gx, int gy, int threads, const std::function<void()>& body) {
  for (int y = 0; y < gy; ++y)
    for (int x = 0; x < gx; ++x) {
      std::barrier<> all(threads);
      std::vector<std::barrier<>*> warps;
      static emu::Block b;
      b.all = &all;
      for (int w = 0; w < (threads + 31) / 32; ++w) {
        warps.push_back(new std::barrier<>(32));
        b.warp[w] = warps.back();
      }
      emu::blk = &b;
      std::vector<std::thread> ts;
      for (int i = 0; i < threads; ++i)
        ts.emplace_back([&, i] {
          threadIdx.x = i;
          blockIdx.x = x;
          blockIdx.y = y;
          body();
        });
      for (auto& th : ts) th.join();
      for (auto* w : warps) delete w;
    }
}
