"""The cpu target's lowering: its weight plan and the rules that call its kernels.

Linear layers (and the gated MLP's gate+up, as one kernel) run the packed-weight kernels of
kernels.py / qkernels.py in GEMV (decode) or GEMM (prefill) form; embeddings read rows out of the
same packed layouts when a table is tied to the LM head or quantized; attention runs the paged
kernels (fp32 cache: kernels.py, int8 cache: kv8.py, latent cache: mla.py). Everything else takes the
generic "relax" rules (targets/common/relax.py).
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax, te

from kiln.errors import UnsupportedOpError
from kiln.ir import Node
from kiln.ops import register_rule
from kiln.targets.common.layouts import padded_k
from kiln.targets.common.relax import FunctionLowering, RelaxLowering, qkey

from . import kernels as K
from . import kv8 as cpu_kv8
from . import mla as cpu_mla
from . import qkernels as Q
from . import sparse24 as S24
from .layouts import Blocked, BlockedQuant, Sparse24, Sparse24Quant


class CpuLowering(RelaxLowering):
    backends = ("cpu", "relax")

    def plan_embedding(self, n: Node) -> bool:
        if n.inputs[0].op == "qweight":
            self.weight_fields(n.inputs[0])  # rows dequantized out of the packed layout
            return True
        return self.packed_too(n.inputs[0])  # a tied table reads its rows out of the LM head's layout

    def packed_too(self, p: Node) -> bool:
        """Is parameter `p` also a linear layer's weight (a table tied to the LM head)?"""
        return p.op == "param" and any(u.op == "linear" and u.inputs[1] is p for u in self.graph.nodes)

    def linear(self, f, x, lead_shape, ws, n_out, bias=None):
        return linear_call(f, x, lead_shape, ws, n_out, bias)

    def sparse24(self, ws: tuple[Node, ...]) -> bool:
        """Do weights `ws` run compressed through the 2:4 kernels (sparse24.py)? Yes when sparsify ran with
        pattern 2:4 (and compressed=true), every weight holds 2:4 exactly (checked on the values: a
        quantized zero must be its group's zero point); a tied embedding then reads its rows out of the
        compressed layout (sparse24.gather_rows)."""
        meta = self.graph.meta.get("sparsity") or {}
        if meta.get("pattern") != "2:4" or not meta.get("compressed", True) or not _host_avx512():
            return False
        cache = self.__dict__.setdefault("_sparse24", {})
        key = tuple(id(w) for w in ws)
        if key not in cache:
            cache[key] = all(self._holds_24(w) for w in ws) and (
                all(w.op == "param" for w in ws)
                or (all(w.op == "qweight" for w in ws) and len({qkey(w) for w in ws}) == 1)
            )
        return bool(cache[key])

    def _holds_24(self, w: Node) -> bool:
        p = self.graph.params
        if w.op == "param":
            return S24.is_24(p[w.attrs["name"]].detach().cpu().numpy() != 0)
        if w.op != "qweight" or w.attrs["bits"] not in (4, 8) or w.attrs["group"] % 4:
            return False
        bits, group, sym = qkey(w)
        codes, _, zeros = (p[w.inputs[j].attrs["name"]].detach().cpu().numpy() for j in range(3))
        nz = ~S24.zero_codes(codes.astype(np.int32), zeros, bits, group, sym)
        pad = padded_k(nz.shape[1], group) - nz.shape[1]  # padded with zero-point codes
        return S24.is_24(np.pad(nz, ((0, 0), (0, pad))))

    def weight_fields(self, *ws: Node) -> list[str]:
        """fp32 weights packed in 32-lane blocks, or quantized codes/scales/zeros in the same blocks; 2:4
        weights compressed (values + positions) in the same blocks."""
        rows = sum(int(w.type.shape[0]) for w in ws)
        k = int(ws[0].type.shape[1])
        if self.sparse24(ws):
            if ws[0].op == "param":
                names = tuple(w.attrs["name"] for w in ws)
                return [
                    self.register(names, Sparse24(part=i), shape, dtype)
                    for i, (shape, dtype) in enumerate(Sparse24().shapes(rows, k))
                ]
            bits, group, sym = qkey(ws[0])
            srcs = tuple(w.inputs[j].attrs["name"] for j in range(3) for w in ws)
            fam24 = Sparse24Quant(bits=bits, group=group, sym=sym)
            return [
                self.register(srcs, Sparse24Quant(part=i, bits=bits, group=group, sym=sym), shape, dtype)
                for i, (shape, dtype) in enumerate(fam24.shapes(rows, k))
            ]
        if all(w.op == "param" for w in ws):
            lay = Blocked(concat=len(ws) > 1)
            return [self.register(tuple(w.attrs["name"] for w in ws), lay, lay.shape(rows, k), ws[0].type.dtype)]
        if all(w.op == "qweight" for w in ws) and len({qkey(w) for w in ws}) == 1:
            bits, group, sym = qkey(ws[0])
            if bits not in (4, 8):
                raise UnsupportedOpError(
                    f"qweight with {bits}-bit codes",
                    ws[0].source,
                    hint=f"target '{self.target_name}' has int8 and int4 kernels; "
                    f"{bits}-bit schemes are for accuracy studies (interpreter) only",
                )
            sources = tuple(w.inputs[j].attrs["name"] for j in range(3) for w in ws)
            fam = BlockedQuant(bits=bits, group=group, sym=sym)
            return [
                self.register(sources, BlockedQuant(part=i, bits=bits, group=group, sym=sym), shape, dtype)
                for i, (shape, dtype) in enumerate(fam.shapes(rows, k))
            ]
        raise UnsupportedOpError(
            "linear over a mix of quantized and fp32 or differently quantized weights", ws[0].source
        )


@functools.cache
def _host_avx512() -> bool:
    """The 2:4 kernels pick activations with an AVX-512 permute (sparse24.py): without it, dense kernels."""
    from tvm.target import codegen

    cpu = str(codegen.llvm_get_system_cpu())
    tgt = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": cpu})
    return "avx512f" in {str(f) for f in codegen.llvm_get_cpu_features(tgt)}


def linear_call(
    f: FunctionLowering, x: relax.Expr, lead_shape, ws: tuple[Node, ...], n_out: int, bias: relax.Expr | None = None
) -> relax.Expr:
    """x [..., k] -> [..., n_out] through the packed-weight kernel (rows flattened to m)."""
    w = ws[0]
    q = qkey(w) if w.op == "qweight" else None
    k = int(w.type.shape[1])
    lead, m = f.rows(x, lead_shape)
    x2 = f.emit(relax.op.reshape(x, [m, k]))
    if q is not None and padded_k(k, q[1]) != k:
        x2 = f.emit(relax.op.nn.pad(x2, [0, 0, 0, padded_k(k, q[1]) - k]))
        k = padded_k(k, q[1])
    if isinstance(f.low, CpuLowering) and f.low.sparse24(ws):
        gv = f.low.kernel(
            ("sparse24", k, n_out, *(q or ()), bias is not None, f.mode),
            lambda: S24.sparse24_linear_func(k, n_out, bias is not None, f.mode, q),
        )
    elif q is None:
        gv = f.low.kernel(
            ("linear", k, n_out, bias is not None, f.mode), lambda: K.linear_func(k, n_out, bias is not None, f.mode)
        )
    else:
        bits, group, sym = q
        gv = f.low.kernel(
            ("qlinear", k, n_out, bits, group, "sym" if sym else "asym", bias is not None, f.mode),
            lambda: Q.qlinear_func(k, n_out, bits, group, sym, bias is not None, f.mode),
        )
    args = [x2] + f.fields(*ws) + ([bias] if bias is not None else [])
    y = f.emit(relax.call_tir(gv, args, relax.TensorType([m, n_out], "float32")))
    return f.emit(relax.op.reshape(y, lead + [n_out]))


def _qembedding(f, n, xs):
    """Rows of a quantized table, dequantized out of the linear kernels' packed layout."""
    w = n.inputs[0]
    bits, group, sym = qkey(w)
    d = int(w.type.shape[1])
    fields = f.fields(w)
    a, b = Q._deq_ab(bits)
    symc = Q._sym_c(bits)
    nb, hb = K.NB, K.NB // 2

    def gather(idx, codes, scales, *zs):
        def row(*i):
            v, k = idx[i[:-1]], i[-1]
            blk, lane = v // nb, v % nb
            if bits == 8:
                c = codes[blk, k, lane].astype("float32")
            else:
                byte = codes[blk, k, lane % hb].astype("int32")
                c = tvm.tirx.if_then_else(lane < hb, byte & 15, byte >> 4).astype("float32")
            fval = c if (a, b) == (1.0, 0.0) else (c / a + b)
            sc = scales[blk, k // group, lane]
            return (fval - symc) * sc if sym else fval * sc + zs[0][blk, k // group, lane]

        return te.compute(tuple(idx.shape) + (d,), row, name="embedding_dequant")

    return f.bb.emit_te(gather, xs[1], *fields)


@register_rule("cpu", "embedding")
def _embedding(f, n, xs):
    w, ids = n.inputs
    if f.low.sparse24((w,)) and (w.op == "qweight" or f.low.packed_too(w)):
        fields = [f.weight(x) for x in f.low.weight_fields(w)]
        quant = qkey(w) if w.op == "qweight" else None
        d = int(w.type.shape[1])
        return f.bb.emit_te(lambda i, *fs: S24.gather_rows(i, list(fs), quant, d), xs[1], *fields)
    if w.op == "qweight":
        return _qembedding(f, n, xs)
    if f.low.packed_too(w):
        packed = f.weight(f.low.weight_fields(w)[0])  # [ceil(V/NB), D, NB]
        nb = K.NB

        def gather(wp, idx):
            # rows of W[V, D] out of the packed [V/NB, D, NB] layout
            return te.compute(
                tuple(idx.shape) + (wp.shape[1],),
                lambda *i: wp[idx[i[:-1]] // nb, i[-1], idx[i[:-1]] % nb],
                name="embedding_packed",
            )

        return f.bb.emit_te(gather, packed, xs[1])
    # mode=clip: TVM's default 'fast' warns on stderr at every build; ids are range-checked at the engine's door
    return f.emit(relax.op.take(xs[0], xs[1], axis=0, mode="clip"))


def _alibi_slopes(n: Node) -> relax.Expr | None:
    """ALiBi slopes [heads] of an attention node as a constant input of its kernel, or None."""
    if n.attrs["alibi"] is None:
        return None
    return relax.const(np.asarray(n.attrs["alibi"], dtype="float32"), "float32")


@register_rule("cpu", "cached_attention")
def _cached_attention(f, n, xs):
    """Append K/V to the paged cache in place, then paged attention: fp32 cache (kernels.py), or int8 codes
    with one scale per token and head (kv8.py), whose append updates both tensors."""
    int8 = n.input("scales") is not None
    if n.attrs["kv_dtype"] and not int8:
        raise UnsupportedOpError(
            f"cached_attention with a {n.attrs['kv_dtype']} KV cache",
            n.source,
            hint=f"target '{f.low.target_name}' has fp32 and int8 KV-cache kernels",
        )
    q, k, v, cache, page_table, positions = xs[:6]
    qn, kn, _, cn = n.inputs[:4]
    heads, kv_heads, head_dim = int(qn.type.shape[1]), int(kn.type.shape[1]), int(kn.type.shape[3])
    page = int(cn.type.shape[3])
    perm = [0, 2, 1, 3]
    qt, kt, vt = (f.emit(relax.op.permute_dims(x, perm)) for x in (q, k, v))  # [B, T, H(kv), D]
    if int8:
        append = f.low.kernel(
            ("kv_append_int8", kv_heads, head_dim, page), lambda: cpu_kv8.kv_append_int8_func(kv_heads, head_dim, page)
        )
        both = f.emit(
            relax.op.call_tir_inplace(
                append,
                [cache, xs[6], kt, vt, page_table, positions],
                [0, 1],
                [f.ttype(cn.type), f.ttype(n.input("scales").type)],
            )
        )
        stored = [f.emit(relax.TupleGetItem(both, 0)), f.emit(relax.TupleGetItem(both, 1))]  # cache, scales
    else:
        append = f.low.kernel(
            ("kv_append", kv_heads, head_dim, page), lambda: K.kv_append_func(kv_heads, head_dim, page)
        )
        stored = [
            f.emit(relax.op.call_tir_inplace(append, [cache, kt, vt, page_table, positions], [0], f.ttype(cn.type)))
        ]
    scale, window, cap = float(n.attrs["scale"]), int(n.attrs["window"]), float(n.attrs["softcap"])
    slopes = _alibi_slopes(n)
    make = cpu_kv8.paged_attention_int8_func if int8 else K.paged_attention_func
    attn = f.low.kernel(
        ("paged_attention_int8" if int8 else "paged_attention", heads, kv_heads, head_dim, page, window, f"{scale:.6g}")
        + (("alibi",) if slopes is not None else ())
        + ((f"softcap{cap:.6g}".replace("+", ""),) if cap else ()),
        lambda: make(heads, kv_heads, head_dim, page, scale, window, alibi=slopes is not None, softcap=cap),
    )
    b, t = f.dims(qn.type.shape[:1])[0], f.dims(qn.type.shape[2:3])[0]
    o = f.emit(
        relax.call_tir(
            attn,
            [qt, *stored, page_table, positions] + ([slopes] if slopes is not None else []),
            relax.TensorType([b, t, heads, head_dim], "float32"),
        )
    )
    return f.emit(relax.op.permute_dims(o, perm))  # back to [B, H, T, D]


@register_rule("cpu", "cached_mla_attention")
def _cached_mla_attention(f, n, xs):
    """Latent attention with absorbed up-projections (targets/cpu/mla.py): q_lat = q_nope W_uk per head,
    attention over the cached latents, then out = o_lat W_uv^T."""
    if n.attrs["alibi"] is not None:
        raise UnsupportedOpError(
            "cached_mla_attention with ALiBi",
            n.source,
            hint="convert-mla keeps RoPE; ALiBi models are not converted to MLA",
        )
    q_nope, q_rope, c, k_rope, w_uk, w_uv, cache, page_table, positions = xs
    qn, rn, cn, kn, _, _, cachen = n.inputs[:7]
    heads, kvh = int(qn.type.shape[1]), int(kn.type.shape[1])
    dn, rd, rank = int(qn.type.shape[3]), int(rn.type.shape[3]), int(cn.type.shape[-1])
    page = int(cachen.type.shape[1])
    b, t = f.dims(qn.type.shape[:1])[0], f.dims(qn.type.shape[2:3])[0]
    rep = heads // kvh
    perm = [0, 2, 1, 3]
    if dn:
        uk = f.emit(relax.op.repeat(w_uk, rep, axis=0)) if rep > 1 else w_uk  # [H, Dn, r]
        q_lat = f.emit(relax.op.permute_dims(f.emit(relax.op.matmul(q_nope, uk)), perm))  # [B, T, H, r]
    else:
        q_lat = f.emit(relax.op.zeros([b, t, heads, rank], "float32"))
    qr = f.emit(relax.op.permute_dims(q_rope, perm))  # [B, T, H, R]
    kr = f.emit(relax.op.reshape(f.emit(relax.op.permute_dims(k_rope, perm)), [b, t, kvh * rd]))
    rows = f.emit(relax.op.concat([c, kr], axis=2))  # [B, T, r + Hkv*R]
    width = rank + kvh * rd
    append = f.low.kernel(("mla_append", width, page), lambda: cpu_mla.mla_append_func(width, page))
    cache2 = f.emit(relax.op.call_tir_inplace(append, [cache, rows, page_table, positions], [0], f.ttype(cachen.type)))
    scale, window = float(n.attrs["scale"]), int(n.attrs["window"])
    attn = f.low.kernel(
        ("paged_mla_attention", heads, kvh, rank, rd, page, window, f"{scale:.6g}"),
        lambda: cpu_mla.paged_mla_attention_func(heads, kvh, rank, rd, page, scale, window),
    )
    o_lat = f.emit(
        relax.call_tir(
            attn, [q_lat, qr, cache2, page_table, positions], relax.TensorType([b, t, heads, rank], "float32")
        )
    )
    uv = f.emit(relax.op.repeat(w_uv, rep, axis=0)) if rep > 1 else w_uv  # [H, Dv, r]
    return f.emit(
        relax.op.matmul(f.emit(relax.op.permute_dims(o_lat, perm)), f.emit(relax.op.permute_dims(uv, [0, 2, 1])))
    )  # [B, H, T, Dv]
