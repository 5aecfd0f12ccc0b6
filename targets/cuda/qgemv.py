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

The kernel body around the instruction is TIR (the loops, the loads kept in flight, the split of K between
the warps of a block and the reduction through shared memory); the step that TIR cannot say (half2
arithmetic on reinterpreted words, the `mma` itself) is a CUDA device function carried in the kernel's
source (`T.cuda.func_call`).
"""

from __future__ import annotations

from tvm.script import tirx as T

WARPS = 8  # warps per block
MB = 16  # activation rows per pass (two n-tiles of 8)
RESIDENT_BLOCKS = 3 * 132  # blocks of 8 warps resident at once on an H200 (~80 registers a thread)


def kblock_cols(bits: int) -> int:
    """Columns of K one lane's 16-byte load covers: 4 k-tiles of int4, 2 of int8."""
    return {4: 64, 8: 32}[bits]


# carried once per kernel that calls it: the guard keeps one definition in the module's source
_SRC = r"""
#ifndef KILN_QMMA
#define KILN_QMMA
// one 16-byte load of a lane: TILES k-tiles of the A fragment (rows g, g+8 of the row tile); x: activations
// [m, k] fp32 of this pass (rows beyond m read as zero); acc: fp32 accumulators of two n-tiles (rows 0-7,
// 8-15); scales applied every TPG k-tiles (a group run), group index from the column.
__device__ __forceinline__ void kiln_mma16816(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ unsigned kiln_h2u(half2 h) { return *reinterpret_cast<unsigned*>(&h); }
__device__ __forceinline__ half2 kiln_u2h(unsigned u) { return *reinterpret_cast<half2*>(&u); }
// the B fragment (2 registers) of activation row `row` at column `col`: branch-free (a row past m reads row 0
// and is zeroed), so that the loads of several k-tiles issue back to back before any conversion waits
__device__ __forceinline__ void kiln_bfrag(const float* __restrict__ x, long long m, int k, int row, int col,
                                           unsigned* b) {
  const float* p = x + (long long)(row < m ? row : 0) * k + col;
  const float2 v0 = *reinterpret_cast<const float2*>(p);
  const float2 v1 = *reinterpret_cast<const float2*>(p + 8);
  const float keep = row < m ? 1.0f : 0.0f;
  b[0] = kiln_h2u(__floats2half2_rn(v0.x * keep, v0.y * keep));
  b[1] = kiln_h2u(__floats2half2_rn(v1.x * keep, v1.y * keep));
}
// the n-tile-0 B fragments of TILES k-tiles from column k0: issued with the weight loads of the same
// iteration, so their latency hides under the weights' (the kernel had waited on each k-tile's in turn)
template <int TILES>
__device__ __forceinline__ void kiln_xfrag(const float* __restrict__ x, long long m, int k, int k0, unsigned* b) {
  const int lane = threadIdx.x & 31;
  #pragma unroll
  for (int j = 0; j < TILES; ++j) kiln_bfrag(x, m, k, lane >> 2, k0 + 16 * j + 2 * (lane & 3), b + 2 * j);
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
template <int BITS, int TILES, int TPG, bool ASYM>
__device__ __forceinline__ void kiln_qmma(const int* __restrict__ w, const unsigned* __restrict__ b0,
                                          const float* __restrict__ x, long long m, int k, int k0,
                                          const float* __restrict__ sz, float* __restrict__ acc) {
  // sz: per group run of this load, the scales of rows g and g + 8 (and their zs), loaded with the weights
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const unsigned ones[4] = {0x3C003C00u, 0x3C003C00u, 0x3C003C00u, 0x3C003C00u};
  const bool two = m > 8;  // a second n-tile (activation rows 8-15): its fragments loaded here, all at once
  unsigned b1[2 * TILES];
  if (two) {
    #pragma unroll
    for (int j = 0; j < TILES; ++j) kiln_bfrag(x, m, k, g + 8, k0 + 16 * j + 2 * t, b1 + 2 * j);
  }
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
      kiln_mma16816(c, a, b0 + 2 * j);
      if (ASYM) kiln_mma16816(o, ones, b0 + 2 * j);
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


def qgemv_config(n: int) -> tuple[int, int]:
    """(warps sharing a row tile (split K), 16-byte loads in flight per lane) for an output size n: split K
    as little as keeps the grid's waves full (fewer partial sums), at least 2 ways."""
    tiles = -(-n // 16)

    def efficiency(split: int) -> float:
        waves = -(-tiles // (WARPS // split)) / RESIDENT_BLOCKS
        return waves / -(-waves // 1)

    best = max(efficiency(sp) for sp in (2, 4, 8))
    return next(sp for sp in (2, 4, 8) if efficiency(sp) > best - 0.05), 4


def qgemv_func(
    k: int,
    n: int,
    bits: int,
    group: int,
    sym: bool,
    bias: bool = False,
    splits: int | None = None,
    loads: int | None = None,
    parts: tuple[int, ...] = (),
):
    """y[m, n] = x[m, k] @ W^T (+ bias) for small m, W as int8/int4 codes in the `QuantMMA` layout (k padded
    to whole 16-byte loads and groups, n to whole row tiles in the codes and scales). The output comes as
    three arrays holding the rows of `parts` (as the fp16 GEMV, targets/cuda/kernels.py)."""
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
    S0, U0 = qgemv_config(n)
    S, U = splits or S0, loads or U0
    if WARPS % S:
        raise ValueError(f"GEMV splits must divide {WARPS}, got {S}")
    tiles_k = KB // 16  # k-tiles per load
    tpg = min(tiles_k, g // 16)  # k-tiles per scale application
    if tiles_k % tpg:
        raise ValueError(f"group {g} does not fit the {bits}-bit loads of {KB} columns")
    rt = -(-n // 16)
    npad = rt * 16
    kblocks = k // KB
    per = -(-kblocks // S)  # loads per warp (contiguous chunk of K)
    outer = -(-per // U)
    ng = -(-k // g)
    RPB = WARPS // S  # row tiles per block
    nblk = -(-rt // RPB)
    words = k * bits // 2  # int32 words per row tile
    zs_shape = (npad, ng) if not sym else (1, 1)
    b_shape = (n,) if bias else (1,)
    XB = 2 * tiles_k  # B-fragment registers per load (n-tile 0)
    NS = tiles_k // tpg  # group runs per load
    call = f"kiln_qmma<{bits}, {tiles_k}, {tpg}, {'false' if sym else 'true'}>"

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
                        acc = T.alloc_buffer((8,), "float32", scope="local")
                        wl = T.alloc_buffer((U * 4,), "int32", scope="local")
                        xb = T.alloc_buffer((U * XB,), "uint32", scope="local")
                        sz = T.alloc_buffer((U * NS * 4,), "float32", scope="local")
                        sums = T.alloc_buffer((WARPS, 32, 8), "float32", scope="shared")
                        red = T.alloc_buffer((1,), "float32", scope="local")
                        tile = T.Bind(bx * RPB + ty // S)
                        ks = T.Bind(ty % S)
                        for i in T.unroll(8):
                            acc[i] = T.float32(0)
                        for i in T.unroll(U * XB):
                            xb[i] = T.uint32(0)  # (all of it written here: the calls below write through pointers)
                        for i in T.unroll(U * NS * 4):
                            sz[i] = T.float32(0)
                        for io in range(outer):
                            for u in T.unroll(U):
                                if io * U + u < per and ks * per + io * U + u < kblocks and tile < rt:
                                    for j in T.vectorized(4):
                                        wl[u * 4 + j] = w[tile, (ks * per + io * U + u) * 128 + tx * 4 + j]
                            # the scales (and zs) of this iteration's group runs: DRAM loads too, issued here
                            for u in T.unroll(U):
                                if io * U + u < per and ks * per + io * U + u < kblocks and tile < rt:
                                    for r in T.unroll(NS):
                                        for h in T.unroll(2):
                                            sz[(u * NS + r) * 4 + h] = T.Cast(
                                                "float32",
                                                s[
                                                    tile * 16 + h * 8 + tx // 4,
                                                    ((ks * per + io * U + u) * KB + r * tpg * 16) // g,
                                                ],
                                            )
                                            if not sym:
                                                sz[(u * NS + r) * 4 + 2 + h] = T.Cast(
                                                    "float32",
                                                    zs[
                                                        tile * 16 + h * 8 + tx // 4,
                                                        ((ks * per + io * U + u) * KB + r * tpg * 16) // g,
                                                    ],
                                                )
                            for u in T.unroll(U):
                                if io * U + u < per and ks * per + io * U + u < kblocks:
                                    T.cuda.func_call(
                                        f"kiln_xfrag<{tiles_k}>",
                                        T.address_of(x[mo * MB, 0]),
                                        m - mo * MB,
                                        k,
                                        (ks * per + io * U + u) * KB,
                                        T.address_of(xb[u * XB]),
                                        source_code=_SRC,
                                    )
                            for u in T.unroll(U):
                                if io * U + u < per and ks * per + io * U + u < kblocks and tile < rt:
                                    T.cuda.func_call(
                                        call,
                                        T.address_of(wl[u * 4]),
                                        T.address_of(xb[u * XB]),
                                        T.address_of(x[mo * MB, 0]),
                                        m - mo * MB,
                                        k,
                                        (ks * per + io * U + u) * KB,
                                        T.address_of(sz[u * NS * 4]),
                                        T.address_of(acc[0]),
                                        source_code=_SRC,
                                    )
                        for i in T.unroll(8):
                            sums[ty, tx, i] = acc[i]
                        T.tvm_storage_sync("shared")
                        # the first warp of each row tile adds the partial sums of its K split and stores
                        if ks == 0 and tile < rt:
                            for i in T.unroll(8):
                                red[0] = sums[ty, tx, i]
                                for sp in T.unroll(1, S):
                                    red[0] = red[0] + sums[ty + sp, tx, i]
                                # c[i]: row g (+8 for i % 4 >= 2), activation row 2t + i % 2 (+8 for i >= 4)
                                if (
                                    mo * MB + (i // 4) * 8 + (tx % 4) * 2 + i % 2 < m
                                    and tile * 16 + (i % 4 // 2) * 8 + tx // 4 < n
                                ):
                                    store(
                                        y0,
                                        y1,
                                        y2,
                                        mo * MB + (i // 4) * 8 + (tx % 4) * 2 + i % 2,
                                        tile * 16 + (i % 4 // 2) * 8 + tx // 4,
                                        red[0] + (b[tile * 16 + (i % 4 // 2) * 8 + tx // 4] if bias else T.float32(0)),
                                    )
                        T.tvm_storage_sync("shared")  # the next mo round rewrites `sums`

    return qgemv
