"""Weight-only quantized CPU kernels (TVM TIR, AVX-512 friendly) for kiln.

Same conventions as :mod:`kernels` (read its module docstring and pitfalls first): every
kernel is a hand-scheduled TVMScript ``PrimFunc`` with explicit ``T.parallel`` / ``T.vectorized`` /
``T.unroll`` loops, scalar lets via ``T.Bind``, and scratch buffers of scope "global" below 1 KiB so
they stay stack allocas (registers).

Quantization (per output row n, per group of ``group`` consecutive k, ``g = k // group``)::

    Wdq[n, k] = (q[n, k] - z[n, g]) * s[n, g]

Reference helpers: :func:`quantize_rtn` (round to nearest), :func:`dequantize`.  Kernels:
:func:`qlinear_func` computes ``out = x @ Wdq.T (+ bias)`` for 4- and 8-bit codes, reading the arrays
made by :func:`pack_qweight` (layout in :func:`qweight_layout`) and never materializing Wdq in memory:

* decode ("gemv"): parallel over 32-lane output blocks; per k the 32 codes are widened to fp32 values
  f in registers (no dequant FMA) and FMA'd into per-group partial sums ``P = sum_k x*f``; at the end
  of each group ``acc += P * s' + X * zs'`` with ``X = sum_k x`` and pre-scaled s', zs' (see _DEQ).
  With one row, 4 independent k partial sums hide the FMA latency.
* prefill ("gemm"): each parallel task (a 32-lane block x a group of row tiles) dequantizes its
  [k, 32] weight block once into a per-task fp32 workspace (L2-resident) and then runs the fp32
  register-blocked loop of ``linear_func``: the dequant cost is shared by 64 rows.

Both modes use the tiling of gemm_template.py; this module supplies only how a block is dequantized.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from .gemm_template import NB, linear_tiles, pack_blocks
from .kernels import cpu_target  # noqa: F401  (re-exported: tests build with it)
from .signature import drop_params

_GEMV_KU = 4  # independent k partial sums in the single-row decode path
_HB = NB // 2  # 16 lanes = one zmm of fp32
_KERNEL_BITS = (4, 8)
_REF_BITS = (2, 3, 4, 8)


# --------------------------------------------------------------------------- reference quantization


def _check(shape: tuple[int, int], bits: int, group: int, kernel: bool = False) -> int:
    allowed = _KERNEL_BITS if kernel else _REF_BITS
    if bits not in allowed:
        raise ValueError(f"bits={bits} not supported (supported: {allowed})")
    n, k = shape
    if group <= 0 or k % group != 0:
        raise ValueError(f"group={group} must divide K: weight shape [N={n}, K={k}]")
    return k // group


def quantize_rtn(
    w: np.ndarray, bits: int, group: int, sym: bool, float_zero: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest quantization of a torch-layout weight w [N, K].

    Returns ``(q, scales, zeros)``: q [N, K] int32 codes in [0, 2^bits - 1]; scales [N, K//group] f32;
    zeros [N, K//group] f32, or None for ``sym`` (codes are offset by 2^(bits-1), the implicit zero point).

    * sym:  s = max|w| / (2^(bits-1) - 1),  q = clamp(round(w/s), -2^(bits-1), 2^(bits-1)-1) + 2^(bits-1)
    * asym: s = (max - min) / (2^bits - 1), z = round(-min/s),  q = clamp(round(w/s) + z, 0, 2^bits - 1)
    * asym, float_zero: z = -min/s unrounded, q = clamp(round(w/s + z), 0, 2^bits - 1) (kiln's `_floatzero`)

    ``group == K`` means per-channel.  Rounding is numpy's (half to even).  A group whose scale would be
    0 (all equal values) gets s = |value| / qmax (or 1 for all zeros) so it reconstructs exactly.  For
    asym, z is a float that lies outside the code range when a group does not span 0.
    Raises ValueError if group does not divide K or bits is not in {2, 3, 4, 8}.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {w.shape}")
    ng = _check(w.shape, bits, group)
    n, k = w.shape
    wg = w.reshape(n, ng, group)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        amax = np.abs(wg).max(axis=2)
        s = (amax / np.float32(qmax)).astype(np.float32)
        s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
        q = np.clip(np.round(wg / s[:, :, None]), -(qmax + 1), qmax) + (qmax + 1)
        return q.reshape(n, k).astype(np.int32), s, None
    qmax = 2**bits - 1
    lo, hi = wg.min(axis=2), wg.max(axis=2)
    s = ((hi - lo) / np.float32(qmax)).astype(np.float32)
    degenerate = np.abs(lo) / np.float32(qmax)
    s = np.where(s > 0, s, np.where(degenerate > 0, degenerate, np.float32(1))).astype(np.float32)
    z = (-lo / s).astype(np.float32)
    if not float_zero:
        z = np.round(z)
    zi = np.round(z)  # round(w/s + frac(z)) + int(z): exactly round(w/s) + z for an integer z, ties included
    q = np.clip(np.round(wg / s[:, :, None] + (z - zi)[:, :, None]) + zi[:, :, None], 0, qmax)
    return q.reshape(n, k).astype(np.int32), s, z


def dequantize(
    q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, group: int, sym: bool
) -> np.ndarray:
    """Reference dequantization: Wdq[n, k] = (q[n, k] - z[n, k // group]) * s[n, k // group], float32 [N, K].

    For sym the zero point is 2^(bits-1) and ``zeros`` is ignored (may be None).
    """
    q = np.asarray(q)
    ng = _check(q.shape, bits, group)
    n, k = q.shape
    s = np.asarray(scales, np.float32).reshape(n, ng, 1)
    z: np.float32 | np.ndarray  # one zero point for sym, [n, ng, 1] for asym
    if sym:
        z = np.float32(2 ** (bits - 1))
    else:
        if zeros is None:
            raise ValueError("asymmetric dequantize needs zeros")
        z = np.asarray(zeros, np.float32).reshape(n, ng, 1)
    wq = q.reshape(n, ng, group).astype(np.float32)
    return ((wq - z) * s).reshape(n, k).astype(np.float32)


# --------------------------------------------------------------------------- packed layout


def qweight_layout(bits: int, group: int, sym: bool) -> str:
    """Description of the arrays made by :func:`pack_qweight` (in kernel argument order)."""
    if bits not in _KERNEL_BITS:
        raise ValueError(f"bits={bits} has no kernel (supported: {_KERNEL_BITS})")
    a, b = _deq_ab(bits)
    nb = f"ceil(N/{NB})"
    if bits == 8:
        codes = f"codes[{nb}, K, {NB}] uint8, codes[b, k, j] = q[b*{NB}+j, k]"
    else:
        codes = f"codes[{nb}, K, {_HB}] uint8, codes[b, k, j] = q[b*{NB}+j, k] | q[b*{NB}+{_HB}+j, k] << 4"
    g = f"K/{group}"
    out = (
        f"q{bits}g{group}{'s' if sym else 'a'}: {codes}; scales[{nb}, {g}, {NB}] f32 = {a:g}*s[b*{NB}+j, g]"
        f" (kernel code value f = {b:g} + q/{a:g})"
    )
    if not sym:
        out += f"; zs[{nb}, {g}, {NB}] f32 = -(z + {a * b:g})*s, Wdq = f*scales + zs"
    else:
        out += f"; Wdq = (f - {_sym_c(bits):g})*scales"
    return out + "; padded rows: code 0, scale 0"


def packed_shapes(n: int, k: int, bits: int, group: int, sym: bool) -> list[tuple[tuple[int, ...], str]]:
    """Shape and dtype of each array :func:`pack_qweight` returns for a weight [n, k] (kernel order)."""
    ng = _check((n, k), bits, group, kernel=True)
    nblk = (n + NB - 1) // NB
    out: list[tuple[tuple[int, ...], str]]
    if bits == 8:
        out = [((nblk, k, NB), "uint8")]
    else:
        out = [((nblk, k, _HB), "uint8")]
    out.append(((nblk, ng, NB), "float32"))
    if not sym:
        out.append(((nblk, ng, NB), "float32"))
    return out


def pack_qweight(
    q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, group: int, sym: bool
) -> list[np.ndarray]:
    """Pack (q, scales, zeros) from :func:`quantize_rtn` into the arrays :func:`qlinear_func` reads.

    Returns [codes, scales] (sym) or [codes, scales, zs] (asym), see :func:`qweight_layout`.
    """
    q = np.asarray(q)
    ng = _check(q.shape, bits, group, kernel=True)
    n, k = q.shape
    nblk = (n + NB - 1) // NB
    qi = q.astype(np.int32)
    if qi.min(initial=0) < 0 or qi.max(initial=0) > 2**bits - 1:
        raise ValueError(f"codes out of range for {bits} bits")
    s = np.asarray(scales, np.float32).reshape(n, ng)
    if bits == 8:
        codes = pack_blocks(qi.astype(np.uint8), nblk)
    else:
        c = pack_blocks(qi.astype(np.uint8), nblk)  # [nblk, K, 32]
        codes = np.ascontiguousarray(c[:, :, :_HB] | (c[:, :, _HB:] << 4)).astype(np.uint8)
    a, b = _deq_ab(bits)
    out = [codes, pack_blocks(s * np.float32(a), nblk)]
    if not sym:
        if zeros is None:
            raise ValueError("asymmetric packing needs zeros")
        z = np.asarray(zeros, np.float32).reshape(n, ng)
        out.append(pack_blocks((-(z + np.float32(a * b)) * s).astype(np.float32), nblk))
    return out


# --------------------------------------------------------------------------- qlinear kernels


# How a code c becomes fp32 f = B + c / A, per bits:
#   "cvt":   f = float(c)                   (A = 1, B = 0): widen + vcvtdq2ps
#   "magic": f = 1 + c / 2^bits, exactly    (A = 2^bits, B = 1): widen, shift, OR into the bits of 1.0f
# sum_k x*Wdq = s'*P + zs'*X with P = sum_k x*f, X = sum_k x, s' = s*A, zs' = -s*(A*B + z).
_DEQ = {8: "cvt", 4: "magic"}  # measured: cvt is faster for 8-bit, magic ties/wins for 4-bit


def _deq_ab(bits: int) -> tuple[float, float]:
    return (1.0, 0.0) if _DEQ[bits] == "cvt" else (float(2**bits), 1.0)


def _sym_c(bits: int) -> float:
    """zs' / s' for symmetric codes (z = 2^(bits-1)): f - _sym_c == (c - z) / A."""
    a, b = _deq_ab(bits)
    return b + 2 ** (bits - 1) / a


def _codes(bits: int, wq, nb, kk, j, half: int):
    """f = B + c / A (exact) for the code c of lane half*16 + j at k = kk (see _DEQ)."""
    v = T.Cast("int32", wq[nb, kk, half * _HB + j] if bits == 8 else wq[nb, kk, j])
    if _DEQ[bits] == "cvt":
        if bits == 4:
            v = T.bitwise_and(v, 15) if half == 0 else T.shift_right(v, 4)
        return T.Cast("float32", v)
    if bits == 8:
        m = T.shift_left(v, 15)  # v < 256: bits 15..22
    else:
        m = T.bitwise_and(T.shift_left(v, 19 if half == 0 else 15), 0x780000)  # nibble -> bits 19..22
    return T.reinterpret("float32", T.bitwise_or(m, 0x3F800000))


def _qlinear_body(k: int, n: int, bits: int, group: int, sym: bool, has_bias: bool, mode: str):
    """Macro computing out = x @ Wdq.T (+ bias) from packed w = (wq, sc, zs); zs is None for sym."""
    G = k // group
    GS = group
    asym = not sym
    symc = _sym_c(bits)
    ku1 = next(u for u in (_GEMV_KU, 2, 1) if GS % u == 0)  # k unroll of the single-row path

    def deq(wq, nb, kk, j, half):
        return _codes(bits, wq, nb, kk, j, half)

    @T.macro
    def dequant_block(wq, sc, zs, wd, nb):
        for g in range(G):
            for kq in range(GS):
                for j in T.vectorized(16):
                    if asym:
                        wd[0, g * GS + kq, j] = deq(wq, nb, g * GS + kq, j, 0) * sc[nb, g, j] + zs[nb, g, j]
                        wd[0, g * GS + kq, 16 + j] = (
                            deq(wq, nb, g * GS + kq, j, 1) * sc[nb, g, 16 + j] + zs[nb, g, 16 + j]
                        )
                    else:  # sym: (f - symc) * s' == (q - 2^(bits-1)) * s exactly
                        wd[0, g * GS + kq, j] = (deq(wq, nb, g * GS + kq, j, 0) - T.float32(symc)) * sc[nb, g, j]
                        wd[0, g * GS + kq, 16 + j] = (deq(wq, nb, g * GS + kq, j, 1) - T.float32(symc)) * sc[
                            nb, g, 16 + j
                        ]

    @T.macro
    def stage(w, wd, nb):
        dequant_block(w[0], w[1], w[2], wd, nb)

    def k_loop(rows: int):
        # ku independent partial sums over k (k unrolled by ku): with one row, a single accumulator pair
        # is bound by the 4-cycle FMA latency, not by the code widening.
        ku = ku1 if rows == 1 else 1

        @T.macro
        def grouped(x, wq, sc, zs, a0, a1, m, i0, nb):
            p0 = T.alloc_buffer((ku * rows, 16), "float32", scope="global")  # group partials sum x*q
            p1 = T.alloc_buffer((ku * rows, 16), "float32", scope="global")
            xs = T.alloc_buffer((ku * rows,), "float32", scope="global")  # group sums of x (asym)
            for g in range(G):
                for r in T.unroll(ku * rows):
                    xs[r] = T.float32(0)
                    for j in T.vectorized(16):
                        p0[r, j] = T.float32(0)
                        p1[r, j] = T.float32(0)
                for kq in range(GS // ku):
                    for u in T.unroll(ku):
                        kk = T.Bind(g * GS + kq * ku + u)
                        for r in T.unroll(rows):
                            for j in T.vectorized(16):
                                p0[u * rows + r, j] = p0[u * rows + r, j] + x[T.min(i0 + r, m - 1), kk] * deq(
                                    wq, nb, kk, j, 0
                                )
                                p1[u * rows + r, j] = p1[u * rows + r, j] + x[T.min(i0 + r, m - 1), kk] * deq(
                                    wq, nb, kk, j, 1
                                )
                            xs[u * rows + r] = xs[u * rows + r] + x[T.min(i0 + r, m - 1), kk]
                for u in T.unroll(ku):
                    for r in T.unroll(rows):
                        for j in T.vectorized(16):
                            if asym:
                                a0[r, j] = (
                                    a0[r, j] + p0[u * rows + r, j] * sc[nb, g, j] + xs[u * rows + r] * zs[nb, g, j]
                                )
                                a1[r, j] = (
                                    a1[r, j]
                                    + p1[u * rows + r, j] * sc[nb, g, 16 + j]
                                    + xs[u * rows + r] * zs[nb, g, 16 + j]
                                )
                            else:  # sym: zs' = -symc * s'
                                a0[r, j] = (
                                    a0[r, j] + (p0[u * rows + r, j] - T.float32(symc) * xs[u * rows + r]) * sc[nb, g, j]
                                )
                                a1[r, j] = (
                                    a1[r, j]
                                    + (p1[u * rows + r, j] - T.float32(symc) * xs[u * rows + r]) * sc[nb, g, 16 + j]
                                )

        @T.macro
        def run(x, w, a0, a1, m, i0, nb):
            grouped(x, w[0], w[1], w[2], a0, a1, m, i0, nb)

        return run

    return linear_tiles(k, n, has_bias, mode, stage=stage, k_loop=k_loop)


def qlinear_func(k: int, n: int, bits: int, group: int, sym: bool, has_bias: bool, mode: str) -> tvm.tirx.PrimFunc:
    """out[m, n] = x[m, k] @ Wdq.T (+ bias[n]) with Wdq dequantized on the fly from packed codes.

    Signature: (x [m, k] f32, *pack_qweight(...) arrays (see packed_shapes), [bias [n] f32], out [m, n] f32),
    m symbolic int64.  bits in {4, 8}; group divides k (group == k: per-channel).
    mode="gemv" (decode, m small) or "gemm" (prefill, m large).
    """
    if mode not in ("gemv", "gemm"):
        raise ValueError(f"unknown qlinear mode {mode!r}")
    shapes = packed_shapes(n, k, bits, group, sym)
    body = _qlinear_body(k, n, bits, group, sym, has_bias, mode)
    (cs, cd), (ss, sd) = shapes[0], shapes[1]

    # T.Buffer(shape, dtype) annotations are TVMScript, not Python types: mypy cannot read them
    @T.prim_func
    def qlinear(
        x_h: T.handle,
        wq: T.Buffer(cs, cd),  # type: ignore[valid-type]
        sc: T.Buffer(ss, sd),  # type: ignore[valid-type]
        zs: T.Buffer(ss, sd),  # type: ignore[valid-type]
        bias: T.Buffer((n,), "float32"),  # type: ignore[valid-type]
        o_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")  # x: [m, k]
        out = T.match_buffer(o_h, (m, n), "float32")  # out: [m, n]
        body(x, (wq, sc, zs), bias, out, m)

    drop = ([] if has_bias else ["bias"]) + (["zs"] if sym else [])
    return drop_params(qlinear, drop, f"qlinear_{'sym' if sym else 'asym'}{'_bias' if has_bias else ''}")
