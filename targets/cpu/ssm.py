"""State-space layers on the CPU: the cached selective scan and causal convolution (ops/ssm.py).

Both kernels update a sequence's state in place (`relax.op.call_tir_inplace`, the state's index 0, the
output freshly allocated) and serve prefill and decode alike: tokens run one after another (the
recurrence), work is split over sequences x heads (scan) or sequences x channels (convolution). A
sequence's state row is `slots[page_table[b, 0]]`; position 0 starts from zeros, positions < 0 are
padding (output zeros, state untouched). Scalars are bound with `T.Bind` and scratch is a tiny
"global" buffer, as in attention_template.py.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from kiln.ops import register_rule


def selective_scan_func(
    heads: int, head_dim: int, state: int, groups: int, softplus: bool, dt_min: float, dt_max: float, gate: bool
) -> tvm.tirx.PrimFunc:
    """Signature: (state [slots, H, P, N] f32 (updated), x [b, t, H, P], dt [b, t, H], A [H, N], B [b, t, G, N],
    C [b, t, G, N], slots [pages] i32, page_table [b, max_pages] i32, positions [b, t] i32, D [H],
    dt_bias [H], z [b, t, H, P] (read when `gate`), out [b, t, H, P]).

    d = softplus(dt + dt_bias) (clamped to [dt_min, dt_max] when set); per state element
    h = exp(d A) h + d B x; y = sum_n C h + D x (* silu(z))."""
    H, P, N, G = heads, head_dim, state, groups
    R = H // G
    SOFTPLUS, GATE = bool(softplus), bool(gate)
    LO, HI = float(dt_min), float(dt_max) if dt_max > 0 else 3.0e38
    CLAMP = dt_min > 0 or dt_max > 0
    L = 16 if N % 16 == 0 else 8 if N % 8 == 0 else 1  # lanes of the readout's partial sums

    @T.prim_func
    def selective_scan(
        s_h: T.handle,
        x_h: T.handle,
        dt_h: T.handle,
        A: T.Buffer((H, N), "float32"),  # type: ignore[valid-type]
        b_h: T.handle,
        c_h: T.handle,
        sl_h: T.handle,
        pt_h: T.handle,
        pos_h: T.handle,
        D: T.Buffer((H,), "float32"),  # type: ignore[valid-type]
        dt_bias: T.Buffer((H,), "float32"),  # type: ignore[valid-type]
        z_h: T.handle,
        o_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        b, t, slots, pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        st = T.match_buffer(s_h, (slots, H, P, N), "float32")  # st: [slots, H, P, N]
        x = T.match_buffer(x_h, (b, t, H, P), "float32")
        dt = T.match_buffer(dt_h, (b, t, H), "float32")
        Bm = T.match_buffer(b_h, (b, t, G, N), "float32")
        Cm = T.match_buffer(c_h, (b, t, G, N), "float32")
        slot_of = T.match_buffer(sl_h, (pages,), "int32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        z = T.match_buffer(z_h, (b, t, H, P), "float32")
        out = T.match_buffer(o_h, (b, t, H, P), "float32")  # out: [b, t, H, P]
        for task in T.parallel(b * H):
            bi = T.Bind(task // H)
            h = T.Bind(task % H)
            g = T.Bind(h // R)
            s = T.Bind(T.Cast("int64", slot_of[T.Cast("int64", page_table[bi, 0])]))
            sc = T.alloc_buffer((1,), "float32", scope="global")  # dt of the token
            dA = T.alloc_buffer((N,), "float32", scope="global")  # exp(d A[h]) of the token
            dB = T.alloc_buffer((N,), "float32", scope="global")  # d B[g] of the token
            acc = T.alloc_buffer((L,), "float32", scope="global")  # lanes of the C readout
            for ti in range(t):
                p = T.Bind(positions[bi, ti])
                if p < 0:
                    for pp in range(P):
                        out[bi, ti, h, pp] = T.float32(0)
                else:
                    if p == 0:
                        for pp in range(P):
                            for n in T.vectorized(N):
                                st[s, h, pp, n] = T.float32(0)
                    sc[0] = dt[bi, ti, h] + dt_bias[h]
                    if SOFTPLUS:
                        sc[0] = T.if_then_else(sc[0] > T.float32(20), sc[0], T.log1p(T.exp(sc[0])))
                    if CLAMP:
                        sc[0] = T.min(T.max(sc[0], T.float32(LO)), T.float32(HI))
                    d = T.Bind(sc[0])
                    for n in T.vectorized(N):
                        dA[n] = T.exp(d * A[h, n])
                        dB[n] = d * Bm[bi, ti, g, n]
                    for pp in range(P):
                        xv = T.Bind(x[bi, ti, h, pp])
                        for n in T.vectorized(N):
                            st[s, h, pp, n] = st[s, h, pp, n] * dA[n] + dB[n] * xv
                        for ll in T.vectorized(L):
                            acc[ll] = T.float32(0)
                        for n0 in range(N // L):
                            for ll in T.vectorized(L):
                                acc[ll] = acc[ll] + st[s, h, pp, n0 * L + ll] * Cm[bi, ti, g, n0 * L + ll]
                        for ll in range(1, L):
                            acc[0] = acc[0] + acc[ll]
                        y = T.Bind(acc[0] + D[h] * xv)
                        if GATE:
                            zv = T.Bind(z[bi, ti, h, pp])
                            out[bi, ti, h, pp] = y * zv / (T.float32(1) + T.exp(-zv))
                        else:
                            out[bi, ti, h, pp] = y

    return selective_scan


def causal_conv1d_func(channels: int, width: int, silu: bool) -> tvm.tirx.PrimFunc:
    """Signature: (state [slots, W - 1, Ch] f32 (updated), x [b, t, Ch], weight [Ch, W], bias [Ch],
    slots [pages] i32, page_table [b, max_pages] i32, positions [b, t] i32, out [b, t, Ch]).
    y = bias + sum_k weight[:, k] * window[k] over the last W inputs (then silu)."""
    CH, W = channels, width
    SILU = bool(silu)

    @T.prim_func
    def causal_conv1d(
        s_h: T.handle,
        x_h: T.handle,
        w: T.Buffer((CH, W), "float32"),  # type: ignore[valid-type]
        bias: T.Buffer((CH,), "float32"),  # type: ignore[valid-type]
        sl_h: T.handle,
        pt_h: T.handle,
        pos_h: T.handle,
        o_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        b, t, slots, pages, max_pages = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        st = T.match_buffer(s_h, (slots, W - 1, CH), "float32")  # st: [slots, W - 1, Ch]
        x = T.match_buffer(x_h, (b, t, CH), "float32")
        slot_of = T.match_buffer(sl_h, (pages,), "int32")
        page_table = T.match_buffer(pt_h, (b, max_pages), "int32")
        positions = T.match_buffer(pos_h, (b, t), "int32")
        out = T.match_buffer(o_h, (b, t, CH), "float32")
        for task in T.parallel(b * CH):
            bi = T.Bind(task // CH)
            c = T.Bind(task % CH)
            s = T.Bind(T.Cast("int64", slot_of[T.Cast("int64", page_table[bi, 0])]))
            acc = T.alloc_buffer((1,), "float32", scope="global")
            for ti in range(t):
                p = T.Bind(positions[bi, ti])
                if p < 0:
                    out[bi, ti, c] = T.float32(0)
                else:
                    if p == 0:
                        for k in range(W - 1):
                            st[s, k, c] = T.float32(0)
                    xv = T.Bind(x[bi, ti, c])
                    acc[0] = bias[c] + w[c, W - 1] * xv
                    for k in range(W - 1):
                        acc[0] = acc[0] + w[c, k] * st[s, k, c]
                    for k in range(W - 2):
                        st[s, k, c] = st[s, k + 1, c]
                    st[s, W - 2, c] = xv
                    if SILU:
                        out[bi, ti, c] = acc[0] / (T.float32(1) + T.exp(-acc[0]))
                    else:
                        out[bi, ti, c] = acc[0]

    return causal_conv1d


def _zeros(n: int) -> relax.Expr:
    return relax.const(np.zeros(n, dtype="float32"), "float32")


@register_rule("cpu", "cached_selective_scan")
def _cached_selective_scan(f, n, xs):
    """The scan kernel above; an absent D or dt_bias is zeros, a scalar A per head [H] is broadcast to
    [H, N] (Mamba-2), so one kernel serves both forms."""
    x, dt, A, B, C, state, slots, page_table, positions = xs[:9]
    xn, bn = n.inputs[0], n.inputs[3]
    H, P, G, N = (int(d) for d in (xn.type.shape[2], xn.type.shape[3], bn.type.shape[2], bn.type.shape[3]))
    D, dt_bias, z = (n.input(k) for k in ("D", "dt_bias", "z"))
    val = dict(zip(n.inputs, xs))
    if n.inputs[2].type.rank == 1:
        A = f.emit(relax.op.broadcast_to(relax.op.reshape(A, [H, 1]), [H, N]))
    a = n.attrs
    fn = f.low.kernel(
        ("selective_scan", H, P, N, G, a["softplus"], f"{a['dt_min']:.6g}", f"{a['dt_max']:.6g}", z is not None),
        lambda: selective_scan_func(H, P, N, G, a["softplus"], a["dt_min"], a["dt_max"], z is not None),
    )
    args = [state, x, dt, A, B, C, slots, page_table, positions]
    args += [val[D] if D is not None else _zeros(H), val[dt_bias] if dt_bias is not None else _zeros(H)]
    args += [val[z] if z is not None else x]  # not read without a gate
    both = f.emit(relax.op.call_tir_inplace(fn, args, [0, -1], [f.ttype(n.inputs[5].type), f.ttype(n.type)]))
    return f.emit(relax.TupleGetItem(both, 1))


@register_rule("cpu", "cached_causal_conv1d")
def _cached_causal_conv1d(f, n, xs):
    x, weight, state, slots, page_table, positions = xs[:6]
    ch, w = (int(d) for d in n.inputs[1].type.shape)
    bias = xs[6] if len(xs) > 6 else _zeros(ch)
    silu = n.attrs["act"] == "silu"
    fn = f.low.kernel(("causal_conv1d", ch, w, silu), lambda: causal_conv1d_func(ch, w, silu))
    both = f.emit(
        relax.op.call_tir_inplace(
            fn,
            [state, x, weight, bias, slots, page_table, positions],
            [0, -1],
            [f.ttype(n.inputs[2].type), f.ttype(n.type)],
        )
    )
    return f.emit(relax.TupleGetItem(both, 1))
