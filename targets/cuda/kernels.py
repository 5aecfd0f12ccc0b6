"""Hand-scheduled CUDA kernels (TVM TIR) for kiln's `cuda` target.

Decode at small batch is bound by memory bandwidth, so the kernels that matter are the weight GEMVs. The
fp16 GEMV is here: each warp owns a few output rows (the warps of a block may split K), each lane streams 16
bytes of weights per load, fp32 accumulation and a warp-shuffle reduction. Quantized weights have their own
tensor-core GEMV (targets/cuda/qgemv.py). Activations stay fp32 (they are tiny at decode); weights and the
KV cache are fp16 or quantized.

fp16 layout (targets/cuda/layouts.py, row-major over the torch weight [N, K], columns stored lane-interleaved:
storage position p holds natural column `natural_column(p)`; Kp = K padded to whole tiles of 256):
  f16            w[N, Kp] float16

The paged decode attention kernel reads K/V pages through the page table: groups of 8 lanes own one
cached token each (32 tokens in flight per block), online softmax per group, merged through shared
memory at the end. Prefill attention on the GPU goes through tensor-core matmuls instead (see
targets/cuda/lowering.py).
"""

from __future__ import annotations

from tvm.script import tirx as T

from .layouts import code_index

WARPS = 4  # warps per GEMV block
MB = 8  # activation rows per GEMV launch (larger batches loop on the host; fp16 uses it at batch 1 only)
_NEG = -1.0e30
E = 8  # fp16 weights per 16-byte load


def gemv_config(n: int) -> tuple[int, int, int]:
    """(rows per warp, 16-byte loads in flight per row and lane, warps sharing a row) for an output size n.

    Two rows per warp, each warp over a whole row: a second row halves the activation traffic per weight (H200,
    Llama-3.1-8B shape, batch-1 decode: 147.6 tok/s with 2 rows against 138.1 with 1 below n = 8192), and
    sharing rows between warps (split K) loses at every shape measured since the decode attention and norms
    were fused (per call, µs, rows x splits 2x1 / 2x2 / 2x4 / 1x4 / 4x2: 8B o 4096 -> 4096 10.9 / 12.4 / 13.9 /
    13.1 / 18.6, down 14336 -> 4096 29.2 / 30.8 / 32.4 / 31.0 / 38.0, q+k+v -> 6144 17.5 / 16.4 / 16.2 / 15.8 /
    25.0; a tensor-parallel rank's o 2048 -> 4096 6.8 / 8.4 / 10.3 / 10.2 / 8.3, down 7168 -> 4096 16.5 / 17.6 /
    18.3 / 18.0 / 24.2; bench/gpu_notes.md, change 25)."""
    return 2, 8 // (2 if n >= 8192 else 1), 1


def gemv_func(
    k: int,
    n: int,
    bias: bool = False,
    rows: int | None = None,
    loads: int | None = None,
    splits: int | None = None,
    parts: tuple[int, ...] = (),
):
    """y[m, n] = x[m, k] @ W^T (+ bias) for small m; W fp16, stored lane-interleaved (targets/cuda/layouts.py:
    lane tx's load of tile t holds columns t*256 + 128*j + 4*tx + e).

    `k` is the padded reduction size (whole tiles; x is zero-padded to it by the lowering). Each warp owns
    `rows` output rows; each lane keeps rows x `loads` 16-byte weight loads in flight, and reads each
    activation once for all its rows, 4 at a time, contiguous across the warp.

    The output comes as three arrays y0, y1, y2 holding the rows of `parts` (stacked weights, e.g. q, k, v,
    each written where its reader wants it; unused arrays are [1, 1]). A launch of a single row (m = 1) runs
    a copy of the loop specialized for it."""
    TC = 32 * E  # columns per tile: one 16-byte load per lane
    if k % TC:
        raise ValueError(f"GEMV reduction size {k} must be a multiple of {TC} for fp16 weights")
    parts = parts or (n,)
    if len(parts) > 3 or sum(parts) != n:
        raise ValueError(f"GEMV output parts {parts} must be at most 3 sizes adding up to {n}")
    c1, c2 = parts[0], parts[0] + (parts[1] if len(parts) > 1 else 0)
    pdims = list(parts) + [1] * (3 - len(parts))
    R0, U0, S0 = gemv_config(n)
    R = rows or R0
    S = splits or S0  # warps per row group, each over every S-th tile
    if WARPS % S:
        raise ValueError(f"GEMV splits must divide {WARPS}, got {S}")
    tiles = k // TC
    per = (tiles + S - 1) // S  # tiles per warp
    U = min(per, loads or U0)
    outer = (per + U - 1) // U
    CH = E // 4  # chunks of 4 columns per load
    RB = WARPS // S * R  # rows per block
    nblk = (n + RB - 1) // RB
    b_shape = (n,) if bias else (1,)

    # the loop over tiles, for NB activation rows (a launch of one row gets its own copy: no row guards)
    @T.macro
    def tiles_loop(NB, x, w, acc, wl, xl, row0, ks, tx, mo, m):
        for io in range(outer):
            for r in T.unroll(R):
                for u in T.unroll(U):
                    if (io * U + u) * S + ks < tiles and row0 + r < n:
                        for j in T.vectorized(E):
                            wl[r, u, j] = w[row0 + r, (((io * U + u) * S + ks) * 32 + tx) * E + j]
            for u in T.unroll(U):
                if (io * U + u) * S + ks < tiles:
                    for i in T.unroll(NB):
                        if mo * MB + i < m:
                            for c in T.unroll(CH):
                                for j in T.vectorized(4):
                                    xl[c * 4 + j] = x[mo * MB + i, ((io * U + u) * S + ks) * TC + c * 128 + tx * 4 + j]
                            for r in T.unroll(R):
                                for j in T.unroll(E):
                                    acc[r, i] = acc[r, i] + T.Cast("float32", wl[r, u, j]) * xl[j]

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
    def gemv(
        var_x: T.handle,
        w: T.Buffer((n, k), "float16"),  # type: ignore[valid-type]
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
                        acc = T.alloc_buffer((R, MB), "float32", scope="local")
                        wl = T.alloc_buffer((R, U, E), "float16", scope="local")
                        xl = T.alloc_buffer((E,), "float32", scope="local")
                        red = T.alloc_buffer((1,), "float32", scope="local")
                        sums = T.alloc_buffer((WARPS, R, MB), "float32", scope="shared")
                        row0 = T.Bind((bx * (WARPS // S) + ty // S) * R)
                        ks = T.Bind(ty % S)
                        for r in T.unroll(R):
                            for i in T.unroll(MB):
                                acc[r, i] = T.float32(0)
                        if m == 1:
                            tiles_loop(1, x, w, acc, wl, xl, row0, ks, tx, mo, m)
                        else:
                            tiles_loop(MB, x, w, acc, wl, xl, row0, ks, tx, mo, m)
                        for r in T.unroll(R):
                            for i in T.unroll(MB):
                                red[0] = acc[r, i]
                                for sh in T.unroll(5):
                                    red[0] = red[0] + T.tvm_warp_shuffle_down(
                                        T.tvm_warp_activemask(), red[0], T.shift_right(16, sh), 32, 32
                                    )
                                if S == 1:
                                    if tx == 0 and mo * MB + i < m and row0 + r < n:
                                        store(
                                            y0,
                                            y1,
                                            y2,
                                            mo * MB + i,
                                            row0 + r,
                                            red[0] + (b[row0 + r] if bias else T.float32(0)),
                                        )
                                else:
                                    if tx == 0:
                                        sums[ty, r, i] = red[0]
                        if S > 1:  # the first warp of each row group adds the other warps' partial sums
                            T.tvm_storage_sync("shared")
                            for r in T.unroll(R):
                                for i in T.unroll(MB):
                                    if tx == 0 and ks == 0 and mo * MB + i < m and row0 + r < n:
                                        red[0] = sums[ty, r, i]
                                        for sp in T.unroll(1, S):
                                            red[0] = red[0] + sums[ty + sp, r, i]
                                        store(
                                            y0,
                                            y1,
                                            y2,
                                            mo * MB + i,
                                            row0 + r,
                                            red[0] + (b[row0 + r] if bias else T.float32(0)),
                                        )
                            T.tvm_storage_sync("shared")  # the next mo round rewrites `sums`

    return gemv


def natural_column(pos, bits: int):
    """The natural column at storage position `pos` (an index expression; targets/cuda/layouts.py
    `storage_columns` is the same map in numpy)."""
    e = 128 // bits
    r = pos % (32 * e)
    return pos - r + 128 * (r % e // 4) + 4 * (r // e) + r % 4


def storage_position(col, bits: int):
    """The storage position of natural column `col` (the inverse of `natural_column`)."""
    e = 128 // bits
    r = col % (32 * e)
    return col - r + (r % 128 // 4) * e + 4 * (r // 128) + r % 4


def dequant_func(n: int, k: int, bits: int, group: int, sym: bool):
    """Quantized codes (the `Quant` layout, targets/cuda/layouts.py) -> fp16 W[n, k] in natural column order
    (prefill and large batches: the GEMM then runs on tensor cores)."""
    g = group or k
    ng = (k + g - 1) // g
    npad = -(-n // 16) * 16
    zc = float(2 ** (bits - 1))
    threads = 256
    zs_shape = (1, 1) if sym else (npad, ng)

    # T.Buffer(shape, dtype) annotations are TVMScript, not Python types: mypy cannot read them
    @T.prim_func(private=True)
    def deq(
        w: T.Buffer((npad // 16, k * bits // 2), "int32"),  # type: ignore[valid-type]
        s: T.Buffer((npad, ng), "float16"),  # type: ignore[valid-type]
        zs: T.Buffer(zs_shape, "float16"),  # type: ignore[valid-type]
        out: T.Buffer((n, k), "float16"),  # type: ignore[valid-type]
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding((n * k + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                idx = T.Bind(bx * threads + tx)
                if idx < n * k:
                    r = T.Bind(idx // k)
                    c = T.Bind(idx % k)
                    tile, word, shift = code_index(r, c, bits)
                    out[r, c] = T.Cast(
                        "float16",
                        (
                            T.Cast("float32", T.bitwise_and(T.shift_right(w[tile, word], shift), (1 << bits) - 1))
                            - (T.float32(zc) if sym else T.float32(0))
                        )
                        * T.Cast("float32", s[r, c // g])
                        + (T.Cast("float32", zs[r, c // g]) if not sym else T.float32(0)),
                    )

    return deq


def kv_append_func(kv_heads: int, head_dim: int, page: int):
    """Write k/v [B, T, Hkv, D] (fp32) into the fp16 paged cache at `positions` (< 0: padding)."""
    threads = kv_heads * head_dim

    @T.prim_func(private=True)
    def append(var_cache: T.handle, var_k: T.handle, var_v: T.handle, var_pt: T.handle, var_pos: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        P, B, Tn, MP = T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (P, 2, kv_heads, page, head_dim), "float16")
        k = T.match_buffer(var_k, (B, Tn, kv_heads, head_dim), "float32")
        v = T.match_buffer(var_v, (B, Tn, kv_heads, head_dim), "float32")
        pt = T.match_buffer(var_pt, (B, MP), "int32")
        pos = T.match_buffer(var_pos, (B, Tn), "int32")
        for bt in T.thread_binding(B * Tn, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                p = T.Bind(pos[bt // Tn, bt % Tn])
                if p >= 0:
                    pg = T.Bind(pt[bt // Tn, p // page])
                    cache[pg, 0, tx // head_dim, p % page, tx % head_dim] = T.Cast(
                        "float16", k[bt // Tn, bt % Tn, tx // head_dim, tx % head_dim]
                    )
                    cache[pg, 1, tx // head_dim, p % page, tx % head_dim] = T.Cast(
                        "float16", v[bt // Tn, bt % Tn, tx // head_dim, tx % head_dim]
                    )

    return append


def paged_decode_func(heads: int, kv_heads: int, head_dim: int, page: int, scale: float, window: int = 0):
    """o[B, T, H, D] = softmax(q k^T * scale, causal/window by position) v over the fp16 paged cache."""
    LPT = 8  # lanes per token
    E = head_dim // LPT
    if head_dim % LPT or E % 8:
        raise ValueError(f"paged decode kernel needs head_dim a multiple of 64, got {head_dim}")
    NT = 512  # 128 registers a thread: one block an SM (256 threads: 9.2 µs a layer, 512: 7.6, TP2 rank at b=1)
    G = NT // LPT  # tokens in flight per block, per round
    U = 4  # rounds whose K/V loads are issued together before any is used (a block is latency-bound at batch 1)
    rep = heads // kv_heads
    sc = float(scale)

    @T.prim_func(private=True)
    def attn(var_q: T.handle, var_cache: T.handle, var_pt: T.handle, var_pos: T.handle, var_o: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        P, B, Tn, MP = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (B, Tn, heads, head_dim), "float32")
        cache = T.match_buffer(var_cache, (P, 2, kv_heads, page, head_dim), "float16")
        pt = T.match_buffer(var_pt, (B, MP), "int32")
        pos = T.match_buffer(var_pos, (B, Tn), "int32")
        o = T.match_buffer(var_o, (B, Tn, heads, head_dim), "float32")
        for blk in T.thread_binding(B * Tn * heads, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                ql = T.alloc_buffer((E,), "float32", scope="local")
                kl = T.alloc_buffer((U, E), "float16", scope="local")
                vl = T.alloc_buffer((U, E), "float16", scope="local")
                acc = T.alloc_buffer((E,), "float32", scope="local")
                st = T.alloc_buffer((4,), "float32", scope="local")  # m, l, s, corr
                sm_m = T.alloc_buffer((G,), "float32", scope="shared")
                sm_l = T.alloc_buffer((G,), "float32", scope="shared")
                sm_o = T.alloc_buffer((G, head_dim), "float32", scope="shared")
                b = T.Bind(blk // (Tn * heads))
                t = T.Bind(blk // heads % Tn)
                h = T.Bind(blk % heads)
                hk = T.Bind(h // rep)
                grp = T.Bind(tx // LPT)
                sub = T.Bind(tx % LPT)
                p = T.Bind(pos[b, t])
                lo = T.Bind(T.max(p - window + 1, 0) if window > 0 else T.int32(0))
                for j0 in T.unroll(E // 4):
                    for j in T.vectorized(4):
                        ql[j0 * 4 + j] = q[b, t, h, sub * E + j0 * 4 + j] * T.float32(sc)
                for j in T.unroll(E):
                    acc[j] = T.float32(0)
                st[0] = T.float32(_NEG)
                st[1] = T.float32(0)
                for it in range((p - lo + G * U) // (G * U)):
                    for u in T.unroll(U):  # every load of the round first
                        if lo + (it * U + u) * G + grp <= p:
                            pg = T.Bind(pt[b, (lo + (it * U + u) * G + grp) // page])
                            for j0 in T.unroll(E // 8):
                                for j in T.vectorized(8):
                                    kl[u, j0 * 8 + j] = cache[
                                        pg, 0, hk, (lo + (it * U + u) * G + grp) % page, sub * E + j0 * 8 + j
                                    ]
                            for j0 in T.unroll(E // 8):
                                for j in T.vectorized(8):
                                    vl[u, j0 * 8 + j] = cache[
                                        pg, 1, hk, (lo + (it * U + u) * G + grp) % page, sub * E + j0 * 8 + j
                                    ]
                    for u in T.unroll(U):
                        if lo + (it * U + u) * G + grp <= p:
                            st[2] = T.float32(0)
                            for j in T.unroll(E):
                                st[2] = st[2] + ql[j] * T.Cast("float32", kl[u, j])
                            for sh in T.unroll(3):
                                st[2] = st[2] + T.tvm_warp_shuffle_xor(
                                    T.tvm_warp_activemask(), st[2], T.shift_left(1, sh), 32, 32
                                )
                            st[3] = T.max(st[0], st[2])
                            st[1] = st[1] * T.exp(st[0] - st[3]) + T.exp(st[2] - st[3])
                            for j in T.unroll(E):
                                acc[j] = acc[j] * T.exp(st[0] - st[3]) + T.exp(st[2] - st[3]) * T.Cast(
                                    "float32", vl[u, j]
                                )
                            st[0] = st[3]
                if sub == 0:
                    sm_m[grp] = st[0]
                    sm_l[grp] = st[1]
                for j in T.unroll(E):
                    sm_o[grp, sub * E + j] = acc[j]
                T.tvm_storage_sync("shared")
                if tx < head_dim:
                    st[0] = T.float32(_NEG)
                    for gi in range(G):
                        st[0] = T.max(st[0], sm_m[gi])
                    st[1] = T.float32(0)
                    st[2] = T.float32(0)
                    for gi in range(G):
                        st[3] = T.exp(sm_m[gi] - st[0])
                        st[1] = st[1] + sm_l[gi] * st[3]
                        st[2] = st[2] + sm_o[gi, tx] * st[3]
                    o[b, t, h, tx] = T.if_then_else(p >= 0, st[2] / T.max(st[1], T.float32(1e-30)), T.float32(0))

    return attn


def gather_kv_func(kv_heads: int, head_dim: int, page: int):
    """K, V [B, Hkv, MP*page, D] fp16 gathered from the paged cache (prefill attention input)."""

    @T.prim_func(private=True)
    def gather(var_cache: T.handle, var_pt: T.handle, var_k: T.handle, var_v: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        P, B, MP = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (P, 2, kv_heads, page, head_dim), "float16")
        pt = T.match_buffer(var_pt, (B, MP), "int32")
        k = T.match_buffer(var_k, (B, kv_heads, MP * page, head_dim), "float16")
        v = T.match_buffer(var_v, (B, kv_heads, MP * page, head_dim), "float16")
        for blk in T.thread_binding(B * kv_heads * MP * page, thread="blockIdx.x"):
            for tx in T.thread_binding(head_dim // 8, thread="threadIdx.x"):
                b = T.Bind(blk // (kv_heads * MP * page))
                hk = T.Bind(blk // (MP * page) % kv_heads)
                s = T.Bind(blk % (MP * page))
                pg = T.Bind(T.max(pt[b, s // page], 0))
                for j in T.vectorized(8):
                    k[b, hk, s, tx * 8 + j] = cache[pg, 0, hk, s % page, tx * 8 + j]
                for j in T.vectorized(8):
                    v[b, hk, s, tx * 8 + j] = cache[pg, 1, hk, s % page, tx * 8 + j]

    return gather
