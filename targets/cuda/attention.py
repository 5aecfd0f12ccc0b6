"""The cuda target's attention rule: the paged KV cache written and read by kiln's kernels.

decode (GEMV program)   rotary of q and k with the KV append in one kernel (rope.py), then the paged decode
                        kernel, one block a query head (kernels.py)
decode_batched          the same append, then the fused tensor-core kernel of prefill, one block a KV head
prefill, verify         the fused kernel over the pages (flash.py); head sizes it does not take: the
                        sequence's pages gathered, two GEMMs around a position-masked softmax
"""

from __future__ import annotations

import tvm
from tvm import relax, te

from kiln.errors import UnsupportedOpError
from kiln.ir import Node
from kiln.ops import register_rule

from . import flash as F
from . import kernels as C
from .lowering import CudaLowering, _matmul_nn, _matmul_nt
from .rope import rope_append_func


@register_rule("cuda", "cached_attention")
def _cached_attention(f, n, xs):
    if n.input("scales") is not None or n.attrs["kv_dtype"]:
        raise UnsupportedOpError(
            f"cached_attention with a {n.attrs['kv_dtype'] or 'quantized'} KV cache",
            n.source,
            hint="target 'cuda' has an fp16 KV cache only; build without --kv-quant",
        )
    if n.attrs["alibi"] is not None:
        raise UnsupportedOpError(
            "cached_attention with ALiBi", n.source, hint="target 'cuda' has no ALiBi kernels yet; use --target cpu"
        )
    if n.attrs["softcap"]:
        raise UnsupportedOpError(
            "cached_attention with softcapped scores",
            n.source,
            hint="target 'cuda' has no softcap yet; use --target cpu",
        )
    q, k, v, cache, page_table, positions = xs[:6]
    qn, kn, _, cn = n.inputs[:4]
    heads, kv_heads, head_dim = int(qn.type.shape[1]), int(kn.type.shape[1]), int(kn.type.shape[3])
    page = int(cn.type.shape[3])
    perm = [0, 2, 1, 3]
    if f.entry.dims.get("tokens") == 1:
        fused = _decode_with_rope_append(f, n, heads, kv_heads, head_dim, page)
        if fused is not None:
            return fused
    kt = f.emit(relax.op.permute_dims(k, perm))
    vt = f.emit(relax.op.permute_dims(v, perm))
    ctype = f.cache_type(cn)
    append = f.low.kernel(
        ("cuda_kv_append", kv_heads, head_dim, page), lambda: C.kv_append_func(kv_heads, head_dim, page)
    )
    cache2 = f.emit(relax.op.call_tir_inplace(append, [cache, kt, vt, page_table, positions], [0], ctype))
    scale, window = float(n.attrs["scale"]), int(n.attrs["window"])
    b, t = f.dims(qn.type.shape[:1])[0], f.dims(qn.type.shape[2:3])[0]
    if f.entry.dims.get("tokens") == 1:
        # one new token per sequence (decode, also when its linears run as GEMMs at large batch): the kernels
        # read each sequence's own pages; the gathered path below would copy every page of the table
        return _decode_attention(f, n, f.emit(relax.op.permute_dims(q, perm)), cache2, page_table, positions)
    if f.low.prefill_attention == "fused" and F.supported(head_dim):
        # prefill and verify: the fused tensor-core kernel reads the pages itself (targets/cuda/flash.py)
        flash = f.low.kernel(
            ("cuda_flash", heads, kv_heads, head_dim, page, window, f"{scale:.6g}"),
            lambda: F.flash_func(heads, kv_heads, head_dim, page, scale, window),
        )
        qf = q if qn.type.dtype == "float32" else f.emit(relax.op.astype(q, "float32"))
        return f.emit(
            relax.call_tir(
                flash, [qf, cache2, page_table, positions], relax.TensorType([b, heads, t, head_dim], "float32")
            )
        )
    # other head sizes: gather the sequence's pages, then tensor-core matmuls with a position mask
    gather = f.low.kernel(
        ("cuda_gather_kv", kv_heads, head_dim, page), lambda: C.gather_kv_func(kv_heads, head_dim, page)
    )
    mp = f.env["max_pages"]
    s_len = mp * page
    kv = f.emit(
        relax.call_tir(gather, [cache2, page_table], [relax.TensorType([b, kv_heads, s_len, head_dim], "float16")] * 2)
    )
    kall, vall = f.emit(relax.TupleGetItem(kv, 0)), f.emit(relax.TupleGetItem(kv, 1))
    rep = heads // kv_heads
    qg = f.emit(relax.op.reshape(f.emit(relax.op.astype(q, "float16")), [b, kv_heads, rep * t, head_dim]))
    scores = _matmul_nt(f, qg, kall, [b, kv_heads, rep * t, s_len])

    def mask(sc, pos):
        def val(bi, hi, r, j):
            p = pos[bi, r % pos.shape[1]]  # rows are (head in group, token): the token is r mod T
            ok = j <= p.astype("int64")
            if window:
                ok = tvm.tirx.all(ok, j > p.astype("int64") - window)
            return tvm.tirx.if_then_else(
                ok, sc[bi, hi, r, j] * tvm.tirx.const(scale, "float32"), tvm.tirx.const(C._NEG, "float32")
            )

        return te.compute(sc.shape, val, name="attention_mask")

    masked = f.bb.emit_te(mask, scores, positions)
    p16 = f.emit(relax.op.astype(f.emit(relax.op.nn.softmax(masked, axis=-1)), "float16"))
    o = _matmul_nn(f, p16, vall, [b, kv_heads, rep * t, head_dim])  # [b, kv_heads, rep*t, D]
    return f.emit(relax.op.reshape(o, [b, heads, t, head_dim]))


def _unrotated(f, low: CudaLowering, r: Node, attention: Node):
    """(x [B, T, H, D], cos, sin) when `r` is rope(permute(x, [0, 2, 1, 3]), cos, sin) read only by `attention`."""
    if r.op != "rope" or any(u is not attention for u in low.users.get(r, [])):
        return None
    x, cos, sin = r.inputs
    if x.op != "permute" or list(x.attrs["perm"]) != [0, 2, 1, 3]:
        return None
    if any(len(c.type.shape) != 4 or c.type.shape[1] != 1 for c in (cos, sin)):
        return None  # cos/sin must be per token, shared by the heads
    return f.value(x.inputs[0]), cos, sin


def _decode_with_rope_append(f, n: Node, heads: int, kv_heads: int, head_dim: int, page: int):
    """Decode attention with the rotary of q and k and the KV append in one kernel before it (targets/cuda/
    rope.py), when q and k come straight from rope over the heads-major transpose; None otherwise."""
    low = f.low
    assert isinstance(low, CudaLowering)  # this rule is registered for the cuda target only
    rq, rk = _unrotated(f, low, n.inputs[0], n), _unrotated(f, low, n.inputs[1], n)
    vn = n.inputs[2]
    if rq is None or rk is None or rq[1:] != rk[1:] or head_dim % 2:
        return None
    if vn.op == "permute" and list(vn.attrs["perm"]) == [0, 2, 1, 3]:
        v = f.value(vn.inputs[0])
    else:
        v = f.emit(relax.op.permute_dims(f.value(vn), [0, 2, 1, 3]))
    b, t = f.dims(n.inputs[0].type.shape[:1])[0], f.dims(n.inputs[0].type.shape[2:3])[0]
    cos, sin = (f.emit(relax.op.reshape(f.value(c), [b, t, head_dim])) for c in rq[1:])
    cache, page_table, positions = (f.value(i) for i in n.inputs[3:6])
    prep = low.kernel(
        ("cuda_rope_append", heads, kv_heads, head_dim, page),
        lambda: rope_append_func(heads, kv_heads, head_dim, page),
    )
    out = f.emit(
        relax.op.call_tir_inplace(
            prep,
            [rq[0], rk[0], v, cos, sin, page_table, positions, cache],
            [7, -1],
            [f.cache_type(n.inputs[3]), relax.TensorType([b, t, heads, head_dim], "float32")],
        )
    )
    cache2, qt = f.emit(relax.TupleGetItem(out, 0)), f.emit(relax.TupleGetItem(out, 1))
    return _decode_attention(f, n, qt, cache2, page_table, positions)


def _decode_attention(f, n: Node, qt, cache, page_table, positions) -> relax.Expr:
    """Attention of one new token per sequence, q as [B, 1, H, D]; returns [B, H, 1, D]. The GEMV program (small
    batches) runs the paged decode kernel, one block a query head; decode_batched runs the fused tensor-core
    kernel of prefill (targets/cuda/flash.py), one block a KV head, so a K/V tile is read once for all query heads
    of its group (at batch 256 the per-head kernel read the cache at 46% of the bandwidth)."""
    qn, kn, _, cn = n.inputs[:4]
    heads, kv_heads, head_dim = int(qn.type.shape[1]), int(kn.type.shape[1]), int(kn.type.shape[3])
    page = int(cn.type.shape[3])
    scale, window = float(n.attrs["scale"]), int(n.attrs["window"])
    b = f.dims(qn.type.shape[:1])[0]
    if f.mode == "gemm" and f.low.prefill_attention == "fused" and F.supported(head_dim):
        flash = f.low.kernel(
            ("cuda_flash", heads, kv_heads, head_dim, page, window, f"{scale:.6g}"),
            lambda: F.flash_func(heads, kv_heads, head_dim, page, scale, window),
        )
        q = f.emit(relax.op.reshape(qt, [b, heads, 1, head_dim]))  # [B, 1, H, D] and [B, H, 1, D]: the same bytes
        return f.emit(
            relax.call_tir(
                flash, [q, cache, page_table, positions], relax.TensorType([b, heads, 1, head_dim], "float32")
            )
        )
    attn = f.low.kernel(
        ("cuda_paged_decode", heads, kv_heads, head_dim, page, window, f"{scale:.6g}"),
        lambda: C.paged_decode_func(heads, kv_heads, head_dim, page, scale, window),
    )
    o = f.emit(
        relax.call_tir(attn, [qt, cache, page_table, positions], relax.TensorType([b, 1, heads, head_dim], "float32"))
    )
    return f.emit(relax.op.permute_dims(o, [0, 2, 1, 3]))
