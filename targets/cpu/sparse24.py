"""2:4 sparse linear kernels for the cpu target: they read compressed weights and never expand them in memory.

A 2:4 weight keeps at most 2 nonzeros in every 4 consecutive inputs of a row. Stored compressed, in the
32-lane output blocks of the dense kernels (gemm_template.py), for a weight W [N, K]:

* ``values`` [ceil(N/32), K/2, 32]: the 2 kept values of group q = k // 4 at rows 2q and 2q+1, in
  increasing input order (fp32), or, quantized, their int8/int4 codes in the layout of
  qkernels.pack_qweight over K/2 with half the group (int4: two lanes per byte), with the same per-group
  scales (and zero points) as the dense quantized weight;
* ``index`` [ceil(N/32), K/4, 16] uint8: per lane and group, i0 | i1 << 2, the positions (0..3, i0 < i1)
  of the kept values; lanes j and j + 16 share a byte (j in the low nibble).

fp32 weight bytes drop to 0.53x (0.5 values + 1/32 index), int4 to about 0.75x.

Decode ("gemv"): per group the 4 activations are loaded once, repeated in each 128-bit lane of a
zmm, and each lane picks its two with one vpermilps each (it reads only the low 2 bits of each index
lane, so the nibbles need shifts, no masks), then FMAs them against the kept values, 16 output lanes
per vector like the dense kernels. The kernels therefore need AVX-512 (the build falls back to the
dense kernels on a host without it). Prefill ("gemm") expands each block, per call, into the per-task fp32 workspace of
the dense kernel (gemm_template's `stage`), so prefill costs what dense prefill costs.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from .gemm_template import NB, linear_tiles, pack_blocks
from .qkernels import _codes, _deq_ab, _sym_c, pack_qweight, packed_shapes
from .signature import drop_params

_HB = NB // 2


# --------------------------------------------------------------------------- packing (numpy)


def is_24(nonzero: np.ndarray) -> bool:
    """Does a [N, K] mask of nonzero weights keep at most 2 in every 4 consecutive inputs?"""
    n, k = nonzero.shape
    return k % 4 == 0 and int(nonzero.reshape(n, k // 4, 4).sum(2).max(initial=0)) <= 2


def _kept(nonzero: np.ndarray) -> np.ndarray:
    """[N, K/4, 2] positions (increasing) of the kept entries of each group; a group with fewer than 2
    nonzeros is filled with its first zero positions (their values are 0)."""
    n, k = nonzero.shape
    g = nonzero.reshape(n, k // 4, 4)
    order = np.argsort(~g, axis=2, kind="stable")[:, :, :2]
    return np.sort(order, axis=2)


def _pack_index(order: np.ndarray) -> np.ndarray:
    """[N, K/4, 2] positions -> index [nblk, K/4, 16] uint8 (see the module docstring)."""
    n = order.shape[0]
    code = (order[:, :, 0] | (order[:, :, 1] << 2)).astype(np.uint8)
    c = pack_blocks(code, -(-n // NB))  # [nblk, K/4, 32]
    return np.ascontiguousarray(c[:, :, :_HB] | (c[:, :, _HB:] << 4)).astype(np.uint8)


def pack_sparse24(w: np.ndarray) -> list[np.ndarray]:
    """A dense fp32 weight [N, K] holding 2:4 zeros -> [values, index]. Raises ValueError if it is not 2:4."""
    w = np.asarray(w, dtype=np.float32)
    if not is_24(w != 0):
        raise ValueError(f"weight [{w.shape[0]}, {w.shape[1]}] is not 2:4 sparse: run sparsify{{pattern=2:4}} first")
    n, k = w.shape
    order = _kept(w != 0)
    vals = np.take_along_axis(w.reshape(n, k // 4, 4), order, axis=2).reshape(n, k // 2)
    return [pack_blocks(vals, -(-n // NB)), _pack_index(order)]


def zero_codes(codes: np.ndarray, zeros: np.ndarray, bits: int, group: int, sym: bool) -> np.ndarray:
    """Where the codes [N, K] dequantize to exactly 0: the code equals the zero point of its group."""
    z = np.full(zeros.shape, 2 ** (bits - 1), np.float32) if sym else np.asarray(zeros, np.float32)
    return codes.astype(np.float32) == np.repeat(z, group, axis=1)[:, : codes.shape[1]]


def pack_sparse24_quant(
    codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, group: int, sym: bool
) -> list[np.ndarray]:
    """Quantized codes [N, K] (K whole groups) whose zero-point codes follow 2:4 -> [codes of the kept
    values, scales, (zs), index]: qkernels.pack_qweight over the kept codes [N, K/2] with group/2."""
    codes = np.asarray(codes).astype(np.int32)
    nz = ~zero_codes(codes, zeros, bits, group, sym)
    if group % 4 or not is_24(nz):
        raise ValueError(f"quantized weight [{codes.shape[0]}, {codes.shape[1]}] (group {group}) is not 2:4 sparse")
    n, k = codes.shape
    order = _kept(nz)
    kept = np.take_along_axis(codes.reshape(n, k // 4, 4), order, axis=2).reshape(n, k // 2)
    return pack_qweight(kept, scales, None if sym else zeros, bits, group // 2, sym) + [_pack_index(order)]


def sparse24_shapes(n: int, k: int, quant: tuple[int, int, bool] | None) -> list[tuple[tuple[int, ...], str]]:
    """Shape and dtype of each array the pack functions return for a weight [n, k] (kernel order)."""
    nblk = -(-n // NB)
    index = ((nblk, k // 4, _HB), "uint8")
    if quant is None:
        return [((nblk, k // 2, NB), "float32"), index]
    bits, group, sym = quant
    return packed_shapes(n, k // 2, bits, group // 2, sym) + [index]


# --------------------------------------------------------------------------- kernels


_LANES = T.ramp(0, 1, _HB)


def _vnib(idx, nb, q, half: int, slot: int):
    """The 16 lanes' positions of kept value `slot` as int32 vectors: only their low 2 bits count (vpermilps)."""
    v = T.Cast("int32x16", idx[nb, q, _LANES])
    shift = 4 * half + 2 * slot
    return v if shift == 0 else T.shift_right(v, T.broadcast(shift, 16))


def _vpick(x, row, q, i):
    """x[row, 4q + i] per lane: the 4 activations repeated in each 128-bit lane, permuted by i (vpermilps)."""
    v4 = x[row, T.ramp(q * 4, 1, 4)]
    tab = T.Shuffle([v4, v4, v4, v4], list(range(16)))
    return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.vpermilvar.ps.512", tab, i)


def _nib(idx, nb, q, j, half: int):
    v = T.Cast("int32", idx[nb, q, j])
    return T.bitwise_and(v, 15) if half == 0 else T.shift_right(v, 4)


def _body(k: int, n: int, has_bias: bool, mode: str, quant: tuple[int, int, bool] | None):
    """Macro computing out = x @ W.T (+ bias) from the compressed w = (values, sc, zs, index)."""
    Q4 = k // 4
    bits, group, sym = quant if quant is not None else (0, k, True)
    GQ = group // 4  # groups of 4 inputs per quantization group
    G = k // group
    symc = _sym_c(bits) if quant is not None else 0.0

    def vval(w, nb, kk, half):
        """The fp32 factor of kept value kk in 16 lanes (fp32: the values; quantized: the codes as f, see
        qkernels._codes, whose bit tricks this repeats on whole vectors)."""
        if quant is None:
            return w[0][nb, kk, T.ramp(half * _HB, 1, _HB)]
        if bits == 8:
            return T.Cast("float32x16", T.Cast("int32x16", w[0][nb, kk, T.ramp(half * _HB, 1, _HB)]))
        v = T.Cast("int32x16", w[0][nb, kk, _LANES])
        m = T.bitwise_and(T.shift_left(v, T.broadcast(19 if half == 0 else 15, 16)), T.broadcast(0x780000, 16))
        return T.reinterpret("float32x16", T.bitwise_or(m, T.broadcast(0x3F800000, 16)))

    def deq(w, nb, g, kk, j, half):
        """A kept value as fp32 (prefill expansion)."""
        if quant is None:
            return w[0][nb, kk, half * _HB + j]
        f, lane = _codes(bits, w[0], nb, kk, j, half), half * _HB + j
        if sym:
            return (f - T.float32(symc)) * w[1][nb, g, lane]
        return f * w[1][nb, g, lane] + w[2][nb, g, lane]

    @T.macro
    def expand_half(w, wd, nb, q, s, h):
        # h is a Python int (0: lanes 0..15, 1: lanes 16..31); it selects the index nibble and the codes
        for j in T.vectorized(16):
            wd[0, q * 4 + s, h * 16 + j] = T.Select(
                T.bitwise_and(_nib(w[3], nb, q, j, h), 3) == s,
                deq(w, nb, q // GQ, 2 * q, j, h),
                T.Select(
                    T.shift_right(_nib(w[3], nb, q, j, h), 2) == s,
                    deq(w, nb, q // GQ, 2 * q + 1, j, h),
                    T.float32(0),
                ),
            )

    @T.macro
    def stage(w, wd, nb):
        for q in range(Q4):
            for s in T.unroll(4):
                expand_half(w, wd, nb, q, s, 0)
                expand_half(w, wd, nb, q, s, 1)

    @T.macro
    def acc_half(x, w, p, xs, row, q, nb, r, h):
        # h is a Python int (see expand_half); whole 16-lane vectors: the picks are vpermilps (below)
        p[h, r, _LANES] = (
            p[h, r, _LANES]
            + _vpick(x, row, q, _vnib(w[3], nb, q, h, 0)) * vval(w, nb, 2 * q, h)
            + _vpick(x, row, q, _vnib(w[3], nb, q, h, 1)) * vval(w, nb, 2 * q + 1, h)
        )
        if quant is not None:
            xs[h, r, _LANES] = (
                xs[h, r, _LANES]
                + _vpick(x, row, q, _vnib(w[3], nb, q, h, 0))
                + _vpick(x, row, q, _vnib(w[3], nb, q, h, 1))
            )

    def k_loop(rows: int):
        @T.macro
        def run(x, w, a0, a1, m, i0, nb):
            # p: sums of x*f over one quantization group (fp32: the whole k), xs: sums of the picked x
            p = T.alloc_buffer((2, rows, 16), "float32", scope="global")
            xs = T.alloc_buffer((2, rows, 16), "float32", scope="global")
            for g in range(G):
                for h in T.unroll(2):
                    for r in T.unroll(rows):
                        for j in T.vectorized(16):
                            p[h, r, j] = T.float32(0)
                            xs[h, r, j] = T.float32(0)
                for qq in range(GQ):
                    q = T.Bind(g * GQ + qq)
                    for r in T.unroll(rows):
                        row = T.Bind(T.min(i0 + r, m - 1))
                        acc_half(x, w, p, xs, row, q, nb, r, 0)
                        acc_half(x, w, p, xs, row, q, nb, r, 1)
                for r in T.unroll(rows):
                    for j in T.vectorized(16):
                        if quant is None:
                            a0[r, j] = a0[r, j] + p[0, r, j]
                            a1[r, j] = a1[r, j] + p[1, r, j]
                        elif sym:  # zs' = -symc * s'
                            a0[r, j] = a0[r, j] + (p[0, r, j] - T.float32(symc) * xs[0, r, j]) * w[1][nb, g, j]
                            a1[r, j] = a1[r, j] + (p[1, r, j] - T.float32(symc) * xs[1, r, j]) * w[1][nb, g, 16 + j]
                        else:
                            a0[r, j] = a0[r, j] + p[0, r, j] * w[1][nb, g, j] + xs[0, r, j] * w[2][nb, g, j]
                            a1[r, j] = a1[r, j] + p[1, r, j] * w[1][nb, g, 16 + j] + xs[1, r, j] * w[2][nb, g, 16 + j]

        return run

    return linear_tiles(k, n, has_bias, mode, stage=stage, k_loop=k_loop)


def sparse24_linear_func(
    k: int, n: int, has_bias: bool, mode: str, quant: tuple[int, int, bool] | None = None
) -> tvm.tirx.PrimFunc:
    """out[m, n] = x[m, k] @ W.T (+ bias[n]) with W read from its compressed 2:4 layout.

    Signature: (x [m, k] f32, values, [scales, [zs]], index (see sparse24_shapes), [bias [n] f32],
    out [m, n] f32), m symbolic int64. quant = (bits, group, sym) for int4/int8 kept values, None for fp32.
    mode="gemv" (decode) or "gemm" (prefill).
    """
    if mode not in ("gemv", "gemm"):
        raise ValueError(f"unknown linear mode {mode!r}")
    if k % 4 or (quant is not None and (quant[1] % 4 or k % quant[1])):
        raise ValueError(f"2:4 kernel needs k divisible by 4 (and by the quantization group): k={k}, quant={quant}")
    shapes = sparse24_shapes(n, k, quant)
    (vs, vd), (ss, sd), (xs_, xd) = shapes[0], shapes[1 if quant else 0], shapes[-1]
    body = _body(k, n, has_bias, mode, quant)

    # T.Buffer(shape, dtype) annotations are TVMScript, not Python types: mypy cannot read them
    @T.prim_func
    def sparse24_linear(
        x_h: T.handle,
        wv: T.Buffer(vs, vd),  # type: ignore[valid-type]
        sc: T.Buffer(ss, sd),  # type: ignore[valid-type]
        zs: T.Buffer(ss, sd),  # type: ignore[valid-type]
        idx: T.Buffer(xs_, xd),  # type: ignore[valid-type]
        bias: T.Buffer((n,), "float32"),  # type: ignore[valid-type]
        o_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")  # x: [m, k]
        out = T.match_buffer(o_h, (m, n), "float32")  # out: [m, n]
        body(x, (wv, sc, zs, idx), bias, out, m)

    drop = [] if has_bias else ["bias"]
    if quant is None:
        drop += ["sc", "zs"]
    elif quant[2]:
        drop += ["zs"]
    kind = "f32" if quant is None else f"q{quant[0]}{'s' if quant[2] else 'a'}"
    return drop_params(sparse24_linear, drop, f"sparse24_{kind}{'_bias' if has_bias else ''}")


def gather_rows(idx, fields: list, quant: tuple[int, int, bool] | None, d: int):
    """te.compute: rows `idx` of W [V, d] out of its compressed fields (a tied 2:4 embedding table, which
    shares the LM head's layout): each element is its group's kept value when its position is kept, else 0."""
    from tvm import te

    vals, index = fields[0], fields[-1]

    def row(*i):
        v, k = idx[i[:-1]], i[-1]
        blk, lane = v // NB, v % NB
        byte = index[blk, k // 4, lane % _HB].astype("int32")
        c = tvm.tirx.if_then_else(lane < _HB, byte & 15, byte >> 4)
        first, second = (c & 3) == k % 4, (c >> 2) == k % 4
        kk = 2 * (k // 4) + tvm.tirx.if_then_else(first, 0, 1)  # the kept slot holding position k
        if quant is None:
            value = vals[blk, kk, lane]
        else:
            bits, group, sym = quant
            if bits == 8:
                code = vals[blk, kk, lane].astype("float32")
            else:
                b = vals[blk, kk, lane % _HB].astype("int32")
                code = tvm.tirx.if_then_else(lane < _HB, b & 15, b >> 4).astype("float32")
            a, off = _deq_ab(bits)
            f = code if (a, off) == (1.0, 0.0) else code / a + off
            sc = fields[1][blk, k // group, lane]
            value = (f - _sym_c(bits)) * sc if sym else f * sc + fields[2][blk, k // group, lane]
        return tvm.tirx.if_then_else(first | second, value, tvm.tirx.const(0, "float32"))

    return te.compute(tuple(idx.shape) + (d,), row, name="embedding_sparse24")
