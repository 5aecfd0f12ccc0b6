"""The quantized decode GEMV of the `cuda` target: int8/int4 codes dequantized in registers straight into the
operand of a tensor-core instruction (`mma.sync.m16n8k16`, fp16 x fp16 -> fp32).

Why tensor cores at batch 1: the CUDA-core GEMV turned each code into an fp32 float and spent an FMA per code
and activation row, about four instructions per weight, so int4 ran at a third of its bandwidth (H200, 8B
shape: gate+up 40 us against 14 us of bytes). Here a 32-bit word of eight int4 codes becomes four half2
operands in eight integer/half instructions (mask and OR into the mantissa of 1024.0, then one half2
subtract or FMA that removes the 1024 and the zero point, both exact), and one `mma` does the 16 x 16 x 8
multiply-accumulate of a row tile, for up to 8 activation rows at once (16 with a second `mma` on the same
weights). Scales apply to the fp32 accumulators once per group run (per 16-byte load), zero points of
asymmetric codes through a second `mma` that sums the activations (value = code * s + zs).

Layout (targets/cuda/layouts.py `QuantMMA`): rows in tiles of 16, each tile's codes in the order of the
`mma` A fragment: lane l = 4g + t of a warp holds, for k-tile kt (16 columns), rows g and g+8, columns
2t, 2t+1, 2t+8, 2t+9. int4: one word per lane and k-tile, nibble order a0 a2 a4 a6 a1 a3 a5 a7 so that
(w & 0x000F000F) gives the pair (a0, a1); a 16-byte load holds 4 k-tiles. int8: two words per lane and
k-tile (bytes a0 a2 a1 a3 | a4 a6 a5 a7); a 16-byte load holds 2 k-tiles. A warp's 32 loads read 512
contiguous bytes.

Work: the warps of a block split K; a warp streams its K chunk of one or two row tiles (two: each activation
fragment feeds both tiles' `mma`s, which pays at batch 16 and on the widest outputs), the weights through a
`cp.async` ring in shared memory DEPTH iterations ahead (no registers held by loads in flight). The kernel
body around the instruction is TIR (the loops, the ring, the reduction of the K split through shared
memory); the step that TIR cannot say (half2 arithmetic on reinterpreted words, the `mma` itself) is a CUDA
device function carried in the kernel's source (`T.cuda.func_call`). Measured settings per shape:
`qgemv_config`, bench/gpu_notes.md changes 13 and 16.
"""

from __future__ import annotations

from tvm.script import tirx as T

WARPS = 8  # warps per block
DEPTH = 3  # iterations of weight loads in flight (cp.async ring in shared memory)
MB = 16  # activation rows per pass (two n-tiles of 8)


def kblock_cols(bits: int) -> int:
    """Columns of K one lane's 16-byte load covers: 4 k-tiles of int4, 2 of int8."""
    return {4: 64, 8: 32}[bits]


# carried once per kernel that calls it: the guard keeps one definition in the module's source
_SRC = r"""
#ifndef KILN_QMMA
#define KILN_QMMA
#include <cuda_fp16.h>
__device__ __forceinline__ void kiln_mma16816(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// weights stream global -> shared with cp.async (no registers held while they are in flight): each lane copies
// its own 16 bytes and reads only those back, so no barrier is needed, only the wait on its own groups.
// `last` is the copy's last word: unused here, it shows TIR's buffer analysis the whole 16 bytes.
__device__ __forceinline__ void kiln_cp16(int* smem, const int* last, const int* gmem) {
  const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void kiln_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void kiln_cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ unsigned kiln_h2u(half2 h) { return *reinterpret_cast<unsigned*>(&h); }
__device__ __forceinline__ half2 kiln_u2h(unsigned u) { return *reinterpret_cast<half2*>(&u); }
// the B fragment (2 registers) of activation row `row` at column `col`: branch-free (a row past m reads row 0,
// its fragment is replaced by zeros), so that the loads of several k-tiles issue back to back
__device__ __forceinline__ void kiln_bfrag(const float* __restrict__ x, long long m, int k, int row, int col,
                                           unsigned* b) {
  const float* p = x + (long long)(row < m ? row : 0) * k + col;
  const float2 v0 = *reinterpret_cast<const float2*>(p);
  const float2 v1 = *reinterpret_cast<const float2*>(p + 8);
  const unsigned u0 = kiln_h2u(__floats2half2_rn(v0.x, v0.y)), u1 = kiln_h2u(__floats2half2_rn(v1.x, v1.y));
  b[0] = row < m ? u0 : 0u;
  b[1] = row < m ? u1 : 0u;
}
// the B fragments of TILES k-tiles from column k0, for activation rows 0-7 and, with B1 (when m > 8), 8-15:
// issued with (or before) the weight loads of their iteration, so their latency hides under the weights'
template <int TILES, bool B1>
__device__ __forceinline__ void kiln_xfrag(const float* __restrict__ x, long long m, int k, int k0, unsigned* b) {
  const int lane = threadIdx.x & 31;
  #pragma unroll
  for (int j = 0; j < TILES; ++j) kiln_bfrag(x, m, k, lane >> 2, k0 + 16 * j + 2 * (lane & 3), b + 2 * j);
  if (B1 && m > 8) {
    #pragma unroll
    for (int j = 0; j < TILES; ++j)
      kiln_bfrag(x, m, k, 8 + (lane >> 2), k0 + 16 * j + 2 * (lane & 3), b + 2 * TILES + 2 * j);
  }
}
template <int BITS, bool ASYM>
__device__ __forceinline__ void kiln_dequant(const int* __restrict__ w, int j, unsigned* a) {
  if (BITS == 4) {
    // (q & 0x000F000F) | 0x64006400 = half2(1024 + n0, 1024 + n4); the high nibbles of each byte come 16x
    const unsigned q = (unsigned)w[j];
    const half2 sub = __float2half2_rn(ASYM ? 1024.0f : 1032.0f);
    const half2 mul = __float2half2_rn(0.0625f), add = __float2half2_rn(ASYM ? -64.0f : -72.0f);
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const unsigned qh = q >> (8 * h);
      a[2 * h] = kiln_h2u(__hsub2(kiln_u2h((qh & 0x000F000Fu) | 0x64006400u), sub));
      a[2 * h + 1] = kiln_h2u(__hfma2(kiln_u2h((qh & 0x00F000F0u) | 0x64006400u), mul, add));
    }
  } else {
    const half2 sub = __float2half2_rn(ASYM ? 1024.0f : 1152.0f);
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const unsigned q = (unsigned)w[2 * j + h];
      a[2 * h] = kiln_h2u(__hsub2(kiln_u2h((q & 0x00FF00FFu) | 0x64006400u), sub));
      a[2 * h + 1] = kiln_h2u(__hsub2(kiln_u2h(((q >> 8) & 0x00FF00FFu) | 0x64006400u), sub));
    }
  }
}
// one 16-byte load of a lane (TILES k-tiles of the A fragment, rows g and g + 8 of a row tile) against the
// B fragments b (rows 0-7; with B1 then rows 8-15, else those are loaded here from x at column k0 when m > 8:
// fewer registers held where no second row tile shares them); acc: fp32 accumulators of the two n-tiles;
// sz: per group run of the load (TPG k-tiles), the scales of rows g and g + 8 (and their zs)
template <int BITS, int TILES, int TPG, bool ASYM, bool B1>
__device__ __forceinline__ void kiln_qmma(const int* __restrict__ ws, const int* last, const unsigned* __restrict__ b,
                                          const float* __restrict__ x, long long m, int k, int k0,
                                          const float* __restrict__ sz, float* __restrict__ acc) {
  int w[4];
  *reinterpret_cast<int4*>(w) = *reinterpret_cast<const int4*>(ws);  // this lane's 16 bytes, from shared
  const unsigned ones[4] = {0x3C003C00u, 0x3C003C00u, 0x3C003C00u, 0x3C003C00u};
  const bool two = m > 8;
  unsigned bl[2 * TILES];
  if (!B1 && two) {
    const int lane = threadIdx.x & 31;
    #pragma unroll
    for (int j = 0; j < TILES; ++j) kiln_bfrag(x, m, k, 8 + (lane >> 2), k0 + 16 * j + 2 * (lane & 3), bl + 2 * j);
  }
  const unsigned* b1 = B1 ? b + 2 * TILES : bl;
  #pragma unroll
  for (int j0 = 0; j0 < TILES; j0 += TPG) {
    const float* q = sz + (j0 / TPG) * 4;
    const float s0 = q[0], s1 = q[1], z0 = ASYM ? q[2] : 0.f, z1 = ASYM ? q[3] : 0.f;
    float c[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    #pragma unroll
    for (int j = j0; j < j0 + TPG; ++j) {
      unsigned a[4];
      kiln_dequant<BITS, ASYM>(w, j, a);
      kiln_mma16816(c, a, b + 2 * j);
      if (ASYM) kiln_mma16816(o, ones, b + 2 * j);
      if (two) {
        kiln_mma16816(c + 4, a, b1 + 2 * j);
        if (ASYM) kiln_mma16816(o + 4, ones, b1 + 2 * j);
      }
    }
    #pragma unroll
    for (int n = 0; n < 8; n += 4) {
      acc[n] += c[n] * s0 + o[n] * z0;
      acc[n + 1] += c[n + 1] * s0 + o[n + 1] * z0;
      acc[n + 2] += c[n + 2] * s1 + o[n + 2] * z1;
      acc[n + 3] += c[n + 3] * s1 + o[n + 3] * z1;
    }
  }
}
#endif
"""


def qgemv_config(n: int, k: int, bits: int) -> tuple[int, int, int]:
    """(warps sharing a row tile (split K), row tiles a warp streams together, 16-byte loads a lane makes per
    row tile and iteration), as measured on the H200 (bench/gpu_notes.md, change 16): int4 outputs of 6144
    rows or more stream two row tiles a warp (each activation fragment then feeds two tiles' `mma`s: m = 1
    7-14% faster, m = 16 25-30%); the rest two loads an iteration. Loading the next iteration's fragments
    during this one (a second register buffer) lost on every 8B shape: more registers, fewer blocks an SM."""
    if bits == 4 and n >= 6144:
        return 8, 2, 1
    return 8, 1, 2


def qgemv_func(
    k: int,
    n: int,
    bits: int,
    group: int,
    sym: bool,
    bias: bool = False,
    splits: int | None = None,
    rows: int | None = None,
    loads: int | None = None,
    parts: tuple[int, ...] = (),
):
    """y[m, n] = x[m, k] @ W^T (+ bias) for small m, W as int8/int4 codes in the `QuantMMA` layout (k padded
    to whole 16-byte loads and groups, n to whole row tiles in the codes and scales). The output comes as
    three arrays holding the rows of `parts` (as the fp16 GEMV, targets/cuda/kernels.py).

    A warp streams `rows` row tiles over its 1/`splits` of K, one 16-byte load a lane and row tile per
    iteration, the loads DEPTH iterations ahead in a `cp.async` ring; the activation fragments and scales of
    an iteration are loaded with its weight copies, before the wait on the ring."""
    KB = kblock_cols(bits)
    if k % KB:
        raise ValueError(f"quantized GEMV reduction size {k} must be a multiple of {KB} for {bits}-bit codes")
    g = group or k
    if g % 16:
        raise ValueError(f"quantized GEMV groups must be multiples of 16 columns, got {g}")
    parts = parts or (n,)
    if len(parts) > 3 or sum(parts) != n:
        raise ValueError(f"GEMV output parts {parts} must be at most 3 sizes adding up to {n}")
    c1, c2 = parts[0], parts[0] + (parts[1] if len(parts) > 1 else 0)
    pdims = list(parts) + [1] * (3 - len(parts))
    S0, R0, U0 = qgemv_config(n, k, bits)
    S, R, U = splits or S0, rows or R0, loads or U0
    if WARPS % S:
        raise ValueError(f"GEMV splits must divide {WARPS}, got {S}")
    tiles_k = KB // 16  # k-tiles per load
    tpg = min(tiles_k, g // 16)  # k-tiles per scale application
    if tiles_k % tpg:
        raise ValueError(f"group {g} does not fit the {bits}-bit loads of {KB} columns")
    rt = -(-n // 16)
    npad = rt * 16
    kblocks = k // KB
    per = -(-kblocks // S)  # loads a lane makes per row tile: a contiguous chunk of K
    outer = -(-per // U)  # iterations of U loads
    ng = -(-k // g)
    RPB = WARPS // S  # row-tile groups per block
    nblk = -(-rt // (RPB * R))
    words = k * bits // 2  # int32 words per row tile
    zs_shape = (npad, ng) if not sym else (1, 1)
    b_shape = (n,) if bias else (1,)
    XB = 4 * tiles_k  # B-fragment registers per load (two n-tiles)
    NS = tiles_k // tpg  # group runs per load
    SZ = U * R * NS * 4  # scale registers per iteration
    D = DEPTH  # iterations of loads in flight ahead of the one computed
    NST = (D + 1) * U * R  # ring slots of 16 bytes per lane
    b1 = "true" if R > 1 else "false"  # the second n-tile's fragments held only where two row tiles share them
    call = f"kiln_qmma<{bits}, {tiles_k}, {tpg}, {'false' if sym else 'true'}, {b1}>"

    @T.macro
    def copy(ring, w, ty, tx, t0, ks, i):
        # iteration i of this warp's K chunk (U loads of 16 bytes a lane and row tile) into its ring slots
        for u in T.unroll(U):
            for r in T.unroll(R):
                if i * U + u < per and ks * per + i * U + u < kblocks and t0 + r < rt:
                    T.cuda.func_call(
                        "kiln_cp16",
                        T.address_of(ring[ty, (((i % (D + 1)) * U + u) * R + r) * 128 + tx * 4]),
                        T.address_of(ring[ty, (((i % (D + 1)) * U + u) * R + r) * 128 + tx * 4 + 3]),
                        T.address_of(w[t0 + r, (ks * per + i * U + u) * 128 + tx * 4]),
                        source_code=_SRC,
                    )
        T.cuda.func_call("kiln_cp_commit", source_code=_SRC)

    @T.macro
    def fetch(x, s, zs, xb, sz, m, mo, tx, t0, ks, i):
        # the activation fragments and scales (and zs) of iteration i
        for u in T.unroll(U):
            if i * U + u < per and ks * per + i * U + u < kblocks:
                T.cuda.func_call(
                    f"kiln_xfrag<{tiles_k}, {b1}>",
                    T.address_of(x[mo * MB, 0]),
                    m - mo * MB,
                    k,
                    (ks * per + i * U + u) * KB,
                    T.address_of(xb[u * XB]),
                    source_code=_SRC,
                )
                for r in T.unroll(R):
                    if t0 + r < rt:
                        for q in T.unroll(NS):
                            for h in T.unroll(2):
                                col = ((ks * per + i * U + u) * KB + q * tpg * 16) // g
                                sz[((u * R + r) * NS + q) * 4 + h] = T.Cast(
                                    "float32", s[(t0 + r) * 16 + h * 8 + tx // 4, col]
                                )
                                if not sym:
                                    sz[((u * R + r) * NS + q) * 4 + 2 + h] = T.Cast(
                                        "float32", zs[(t0 + r) * 16 + h * 8 + tx // 4, col]
                                    )

    @T.macro
    def step(x, s, zs, w, ring, xb, sz, acc, m, mo, ty, tx, t0, ks, io):
        # iteration io: its loads D ahead, its fragments and scales, then its mma's
        copy(ring, w, ty, tx, t0, ks, io + D)
        fetch(x, s, zs, xb, sz, m, mo, tx, t0, ks, io)
        T.cuda.func_call(f"kiln_cp_wait<{D}>", source_code=_SRC)  # iteration io has landed
        for u in T.unroll(U):
            for r in T.unroll(R):
                if io * U + u < per and ks * per + io * U + u < kblocks and t0 + r < rt:
                    T.cuda.func_call(
                        call,
                        T.address_of(ring[ty, (((io % (D + 1)) * U + u) * R + r) * 128 + tx * 4]),
                        T.address_of(ring[ty, (((io % (D + 1)) * U + u) * R + r) * 128 + tx * 4 + 3]),
                        T.address_of(xb[u * XB]),
                        T.address_of(x[mo * MB, 0]),
                        m - mo * MB,
                        k,
                        (ks * per + io * U + u) * KB,
                        T.address_of(sz[(u * R + r) * NS * 4]),
                        T.address_of(acc[r * 8]),
                        source_code=_SRC,
                    )

    @T.macro
    def store(y0, y1, y2, i, row, val):
        if row < c1:
            y0[i, row] = val
        elif row < c2:
            y1[i, row - c1] = val
        else:
            y2[i, row - c2] = val

    # T.Buffer(shape, dtype) annotations are TVMScript, not Python types: mypy cannot read them
    @T.prim_func(private=True)
    def qgemv(
        var_x: T.handle,
        w: T.Buffer((rt, words), "int32"),  # type: ignore[valid-type]
        s: T.Buffer((npad, ng), "float16"),  # type: ignore[valid-type]
        zs: T.Buffer(zs_shape, "float16"),  # type: ignore[valid-type]
        b: T.Buffer(b_shape, "float32"),  # type: ignore[valid-type]
        var_y0: T.handle,
        var_y1: T.handle,
        var_y2: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), "float32")
        y0 = T.match_buffer(var_y0, (m, pdims[0]), "float32")
        y1 = T.match_buffer(var_y1, (m, pdims[1]) if len(parts) > 1 else (1, 1), "float32")
        y2 = T.match_buffer(var_y2, (m, pdims[2]) if len(parts) > 2 else (1, 1), "float32")
        for mo in range((m + MB - 1) // MB):
            for bx in T.thread_binding(nblk, thread="blockIdx.x"):
                for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        acc = T.alloc_buffer((8 * R,), "float32", scope="local")
                        ring = T.alloc_buffer((WARPS, NST * 128), "int32", scope="shared")
                        xb = T.alloc_buffer((U * XB,), "uint32", scope="local")
                        sz = T.alloc_buffer((SZ,), "float32", scope="local")
                        sums = T.alloc_buffer((WARPS, 32, 8 * R), "float32", scope="shared")
                        red = T.alloc_buffer((1,), "float32", scope="local")
                        t0 = T.Bind((bx * RPB + ty // S) * R)  # this warp's first row tile
                        ks = T.Bind(ty % S)
                        for i in T.unroll(8 * R):
                            acc[i] = T.float32(0)
                        for i in T.unroll(U * XB):
                            xb[i] = T.uint32(0)  # (all of it written here: the calls below write through pointers)
                        for i in T.unroll(SZ):
                            sz[i] = T.float32(0)
                        for d in T.unroll(D):  # D iterations of weights in flight before the first is used
                            copy(ring, w, ty, tx, t0, ks, d)
                        for io in range(outer):
                            step(x, s, zs, w, ring, xb, sz, acc, m, mo, ty, tx, t0, ks, io)
                        # every warp is done with its ring (the planner may give `sums` the ring's memory)
                        T.tvm_storage_sync("shared")
                        for i in T.unroll(8 * R):
                            sums[ty, tx, i] = acc[i]
                        T.tvm_storage_sync("shared")
                        # the first warp of each row-tile group adds the partial sums of its K split and stores
                        if ks == 0:
                            for r in T.unroll(R):
                                for i in T.unroll(8):
                                    red[0] = sums[ty, tx, r * 8 + i]
                                    for sp in T.unroll(1, S):
                                        red[0] = red[0] + sums[ty + sp, tx, r * 8 + i]
                                    # c[i]: row g (+8 for i % 4 >= 2), activation row 2t + i % 2 (+8 for i >= 4)
                                    if (
                                        mo * MB + (i // 4) * 8 + (tx % 4) * 2 + i % 2 < m
                                        and (t0 + r) * 16 + (i % 4 // 2) * 8 + tx // 4 < n
                                    ):
                                        store(
                                            y0,
                                            y1,
                                            y2,
                                            mo * MB + (i // 4) * 8 + (tx % 4) * 2 + i % 2,
                                            (t0 + r) * 16 + (i % 4 // 2) * 8 + tx // 4,
                                            red[0]
                                            + (b[(t0 + r) * 16 + (i % 4 // 2) * 8 + tx // 4] if bias else T.float32(0)),
                                        )
                        T.tvm_storage_sync("shared")  # the next mo round rewrites `sums`

    return qgemv
