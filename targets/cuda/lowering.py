"""The cuda target's lowering: its weight plan and the rules that call its kernels.

What runs where:
  decode (tokens = 1, batch 1 with  kiln's GEMV kernels (fp16 on CUDA cores; int8 / int4 dequantized in
  fp16 weights, <= 16 quantized)    registers into tensor-core `mma` operands, targets/cuda/qgemv.py; q, k
                                    and v as one launch) and the paged decode attention kernel
  decode_batched (larger batches)   linears as prefill; attention through the paged decode kernel
  prefill, verify                   tensor-core GEMMs through cuBLAS, called by the runtime
                                    (`kiln.cuda.gemm_nt` / `gemm_nn`; quantized weights are
                                    dequantized to fp16 first), and attention in one fused
                                    tensor-core kernel over the pages (targets/cuda/flash.py; head
                                    sizes it does not take: gathered K/V + batched GEMMs with a
                                    position mask). TVM 0.27's own tensor-core
                                    rule (DLight MatmulTensorization) crashes in tensorize, so
                                    gemm="tvm" builds CUDA-core schedules instead.
  RMSNorm                           one kernel, with the residual add before it (targets/cuda/norms.py)
  everything else                   the generic "relax" rules, scheduled by DLight (rotary, SiLU * up)
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from kiln.errors import UnsupportedOpError
from kiln.ir import Graph, Node
from kiln.ops import find_rule, register_rule
from kiln.targets.common.relax import FunctionLowering, RelaxLowering, qkey, split_rows

from . import kernels as C
from .layouts import F16, Quant, code_index, packed_shapes, padded_cols, scale_group, storage_columns
from .norms import rms_norm_func
from .qgemv import qgemv_func
from .sample import sample_func


class CudaLowering(RelaxLowering):
    backends = ("cuda", "relax")
    cache_dtype = "float16"
    fuse_siblings = True

    def __init__(
        self,
        graph: Graph,
        target_name: str = "cuda",
        gemm: str = "cublas",
        gemv_rows: int | None = None,
        gemv_splits: int | None = None,
        prefill_attention: str = "fused",
    ) -> None:
        self.gemm, self.prefill_attention = gemm, prefill_attention
        self.gemv_rows, self.gemv_splits = gemv_rows, gemv_splits
        super().__init__(graph, target_name)
        self.users = graph.users()

    def lower(self, entry_points):
        if "decode" in entry_points:
            self.sample_function()
        return super().lower(entry_points)

    def sample_function(self) -> None:
        """`sample(logits[B, T, V], temperature[B], key[B]) -> tokens[B]`: the decode step's draws on the device
        (targets/cuda/sample.py), so a step returns token ids rather than logits to the host."""
        vocab = int(self.graph.outputs[0].type.shape[-1])
        gv = self.kernel(("cuda_sample", vocab), lambda: sample_func(vocab))
        b, t = tvm.tirx.Var("batch", "int64"), tvm.tirx.Var("tokens", "int64")
        logits = relax.Var("logits", relax.TensorType([b, t, vocab], "float32"))
        temp = relax.Var("temperature", relax.TensorType([b], "float32"))
        key = relax.Var("key", relax.TensorType([b], "int32"))
        with self.bb.function("sample", [logits, temp, key]):
            with self.bb.dataflow():
                out = self.bb.emit_output(relax.call_tir(gv, [logits, temp, key], relax.TensorType([b], "int32")))
            self.bb.emit_func_output(out)

    def plan_embedding(self, n: Node) -> bool:
        self.weight_fields(n.inputs[0])  # fp16 rows (or codes), shared with a tied LM head
        return True

    def linear(self, f, x, lead_shape, ws, n_out, bias=None):
        return cuda_linear(f, x, lead_shape, ws, n_out, bias)[0]

    def linear_parts(self, f, x, lead_shape, ws, parts, bias=None):
        if len(parts) > 3:
            return super().linear_parts(f, x, lead_shape, ws, parts, bias)
        return cuda_linear(f, x, lead_shape, ws, sum(parts), bias, tuple(parts))

    def weight_fields(self, *ws: Node) -> list[str]:
        rows = sum(int(w.type.shape[0]) for w in ws)
        if all(w.op == "param" for w in ws):
            k = padded_cols(int(ws[0].type.shape[1]), 16)
            return [self.register(tuple(w.attrs["name"] for w in ws), F16(), (rows, k), "float16")]
        if all(w.op == "qweight" for w in ws) and len({qkey(w) for w in ws}) == 1:
            bits, group, sym = qkey(ws[0])
            if bits not in (4, 8):
                raise UnsupportedOpError(
                    f"qweight with {bits}-bit codes", ws[0].source, hint="target 'cuda' has int8 and int4 kernels"
                )
            if group % 16:
                raise UnsupportedOpError(
                    f"int{bits} weights in groups of {group}",
                    ws[0].source,
                    hint="target 'cuda' needs groups that are multiples of 16 columns (one tensor-core k-tile)",
                )
            k = int(ws[0].type.shape[1])
            sources = tuple(w.inputs[j].attrs["name"] for j in range(3) for w in ws)
            return [
                self.register(sources, Quant(part=i, bits=bits, group=group, sym=sym), tuple(shape), dtype)
                for i, (shape, dtype) in enumerate(packed_shapes(rows, k, bits, group, sym))
            ]
        raise UnsupportedOpError(
            "linear over a mix of quantized and fp16 or differently quantized weights", ws[0].source
        )


# -- rules ------------------------------------------------------------------------------------------


def _dummy(f, shape, dtype):
    key = ("dummy", tuple(shape), dtype)
    if key not in f.values:
        f.values[key] = relax.const(np.zeros(shape, dtype), dtype)
    return f.values[key]


def cuda_linear(
    f: FunctionLowering,
    x: relax.Expr,
    lead_shape,
    ws: tuple[Node, ...],
    n_out: int,
    bias: relax.Expr | None = None,
    parts: tuple[int, ...] = (),
) -> list[relax.Expr]:
    """x [..., k] fp32 -> [..., n_out] fp32 through the GEMV kernel (decode) or a tensor-core GEMM; with
    `parts` (stacked weights), one output per part, the GEMV writing each directly."""
    w = ws[0]
    fields = f.fields(*ws)
    q = qkey(w) if w.op == "qweight" else None
    k = int(w.type.shape[1])
    bits, group, sym = q if q else (16, 0, True)
    lead, m = f.rows(x, lead_shape)
    x2 = f.emit(relax.op.reshape(x, [m, k]))
    kp = padded_cols(k, bits, group)
    group = scale_group(k, bits, group) if q else 0
    parts = parts or (n_out,)
    if kp != k:
        x2 = f.emit(relax.op.nn.pad(x2, [0, 0, 0, kp - k]))
    if f.mode == "gemv":
        low = f.low
        assert isinstance(low, CudaLowering)  # this rule is registered for the cuda target only
        rows, splits = low.gemv_rows, low.gemv_splits
        b = bias if bias is not None else _dummy(f, (1,), "float32")
        if q:
            gv = low.kernel(
                ("cuda_qgemv", kp, n_out, bits, group, "sym" if sym else "asym", bias is not None)
                + ((f"s{splits}",) if splits else ())
                + (("parts",) + parts if len(parts) > 1 else ()),
                lambda: qgemv_func(kp, n_out, bits, group, sym, bias is not None, splits=splits, parts=parts),
            )
            zs = fields[2] if not sym else _dummy(f, (1, 1), "float16")
            args = [x2, fields[0], fields[1], zs, b]
        else:
            gv = low.kernel(
                ("cuda_gemv", kp, n_out, bias is not None)
                + ((f"r{rows}",) if rows else ())
                + ((f"s{splits}",) if splits else ())
                + (("parts",) + parts if len(parts) > 1 else ()),
                lambda: C.gemv_func(kp, n_out, bias is not None, rows=rows, splits=splits, parts=parts),
            )
            args = [x2, fields[0], b]
        out_types = [relax.TensorType([m, p], "float32") for p in parts]
        out_types += [relax.TensorType([1, 1], "float32")] * (3 - len(parts))
        ys = f.emit(relax.call_tir(gv, args, out_types))
        return [f.emit(relax.op.reshape(f.emit(relax.TupleGetItem(ys, i)), lead + [p])) for i, p in enumerate(parts)]
    # an fp16 x comes from a norm that wrote it in the order these weights want (`_gemm_input_order`)
    fp16_in = str(x2.ty.dtype) == "float16"
    if q:  # dequantized to fp16 in natural column order
        x16 = x2 if fp16_in else f.emit(relax.op.astype(x2, "float16"))
        dq = f.low.kernel(
            ("cuda_dequant", n_out, kp, bits, group, "sym" if sym else "asym"),
            lambda: C.dequant_func(n_out, kp, bits, group, sym),
        )
        zs = fields[2] if not sym else _dummy(f, (1, 1), "float16")
        w16 = f.emit(relax.call_tir(dq, [fields[0], fields[1], zs], relax.TensorType([n_out, kp], "float16")))
    else:  # fp16 columns are stored lane-interleaved: the activations take the same order, cast in the same pass
        x16 = x2 if fp16_in else _to_storage_f16(f, x2, kp)
        w16 = fields[0]
    y = _matmul_nt(f, x16, w16, [m, n_out])
    if bias is not None:
        y = f.emit(relax.op.add(y, bias))
    y = f.emit(relax.op.reshape(y, lead + [n_out]))
    return [y] if len(parts) == 1 else split_rows(f, y, parts)


def _to_storage_f16(f, x: relax.Expr, kp: int) -> relax.Expr:
    """fp32 x[m, kp] -> fp16 in the storage column order of fp16 weights, one kernel (a cast followed by a
    `take` stay two kernels: TVM does not fuse them)."""

    def permute(a, cols):
        return te.compute(a.shape, lambda i, j: a[i, cols[j]].astype("float16"), name="to_storage")

    return f.bb.emit_te(permute, x, _storage_columns(f, kp))


def _storage_columns(f, k: int) -> relax.Expr:
    """The natural column at each storage position of fp16 weights of k columns (a constant, once per function)."""
    key = ("columns", k)
    if key not in f.values:
        f.values[key] = relax.const(storage_columns(k, 16).astype("int32"), "int32")
    return f.values[key]


def _matmul_nt(f, a: relax.Expr, b: relax.Expr, out_shape: list) -> relax.Expr:
    """fp16 a[..., m, k] x b[..., n, k]^T -> fp32 [..., m, n] on tensor cores: cuBLAS through the
    runtime's `kiln.cuda.gemm_nt` (default), or TVM's own schedule (gemm="tvm")."""
    if f.low.gemm == "cublas":
        return f.emit(relax.call_dps_packed("kiln.cuda.gemm_nt", [a, b], relax.TensorType(out_shape, "float32")))
    perm = list(range(len(out_shape) - 2)) + [len(out_shape) - 1, len(out_shape) - 2]
    return f.emit(relax.op.matmul(a, f.emit(relax.op.permute_dims(b, perm)), out_dtype="float32"))


def _matmul_nn(f, a: relax.Expr, b: relax.Expr, out_shape: list) -> relax.Expr:
    """fp16 a[..., m, k] x b[..., k, n] -> fp32 [..., m, n]."""
    if f.low.gemm == "cublas":
        return f.emit(relax.call_dps_packed("kiln.cuda.gemm_nn", [a, b], relax.TensorType(out_shape, "float32")))
    return f.emit(relax.op.matmul(a, b, out_dtype="float32"))


@register_rule("cuda", "embedding")
def _embedding(f, n, xs):
    w, ids = n.inputs
    fields = f.fields(w)
    d = int(w.type.shape[1])
    if w.op != "qweight":

        def rows(idx, table):  # the table's columns are stored lane-interleaved (shared with a tied LM head)
            return te.compute(
                tuple(idx.shape) + (d,),
                lambda *i: table[idx[i[:-1]], C.storage_position(i[-1], 16)].astype("float32"),
                name="embedding_rows",
            )

        return f.bb.emit_te(rows, xs[1], fields[0])
    bits, group, sym = qkey(w)
    group = scale_group(d, bits, group)
    zc = float(2 ** (bits - 1))

    def gather(idx, codes, scales, *zs):
        def row(*i):
            v, c = idx[i[:-1]], i[-1]
            tile, word, shift = code_index(v, c, bits)
            code = ((codes[tile, word] >> shift.astype("int32")) & ((1 << bits) - 1)).astype("float32")
            s = scales[v, c // group].astype("float32")
            return code * s + zs[0][v, c // group].astype("float32") if zs else (code - zc) * s

        return te.compute(tuple(idx.shape) + (d,), row, name="embedding_dequant")

    return f.bb.emit_te(gather, xs[1], *fields)


@register_rule("cuda", "gated_mlp")
def _gated_mlp(f, n, xs):
    """In the GEMM programs, SiLU(gate) * up is written in one kernel as the down projection's GEMM reads it
    (fp16, in the fp16 weights' storage column order or natural order for dequantized weights): the generic
    rule writes it in fp32, and a cast and a permutation then run as one more pass."""
    x, wg, wu, wd = n.inputs
    ffn = int(wg.type.shape[0])
    bits, group, _ = qkey(wd) if wd.op == "qweight" else (16, 0, True)
    if f.mode == "gemv" or n.attrs["act"] != "silu" or padded_cols(ffn, bits, group) != ffn:
        return find_rule("gated_mlp", ("relax",))(f, n, xs)
    lead, m = f.rows(xs[0], x.type.shape[:-1])
    gu = f.emit(relax.op.reshape(f.low.linear(f, xs[0], x.type.shape[:-1], (wg, wu), 2 * ffn), [m, 2 * ffn]))

    def silu_mul(a, cols=None):
        def value(i, j):
            c = cols[j] if bits == 16 else j
            g = a[i, c]
            return (g * tvm.tirx.sigmoid(g) * a[i, ffn + c]).astype("float16")

        return te.compute((a.shape[0], ffn), value, name="silu_mul_f16")

    h = f.bb.emit_te(silu_mul, gu, _storage_columns(f, ffn)) if bits == 16 else f.bb.emit_te(silu_mul, gu)
    h = f.emit(relax.op.reshape(h, lead + [ffn]))
    return f.low.linear(f, h, n.type.shape[:-1], (wd,), int(wd.type.shape[0]))


@register_rule("cuda", "rms_norm")
def _rms_norm(f, n, xs):
    """One kernel per norm; a residual add feeding it (and later read by the next residual) runs inside it."""
    x = n.inputs[0]
    d = int(x.type.shape[-1])
    if d % 4 or x.type.dtype != "float32":
        return find_rule("rms_norm", ("relax",))(f, n, xs)
    low = f.low
    assert isinstance(low, CudaLowering)  # this rule is registered for the cuda target only
    add = x if _fusable_add(f, low, x, n) else None
    a, b = (f.value(add.inputs[0]), f.value(add.inputs[1])) if add is not None else (xs[0], None)
    lead, m = f.rows(a, x.type.shape)
    a2 = f.emit(relax.op.reshape(a, [m, d]))
    eps = float(n.attrs["eps"])
    order = _gemm_input_order(f, low, n)
    out_dtype = "float16" if order else "float32"
    kern = low.kernel(
        ("cuda_rms_norm", d, f"{eps:.3g}", add is not None) + ((order,) if order else ()),
        lambda: rms_norm_func(d, eps, add is not None, out_dtype, order == "storage"),
    )
    b2 = f.emit(relax.op.reshape(b, [m, d])) if add is not None else _dummy(f, (1, 1), "float32")
    h_type = relax.TensorType([m, d] if add is not None else [1, 1], "float32")
    out = f.emit(relax.call_tir(kern, [a2, b2, xs[1]], [h_type, relax.TensorType([m, d], out_dtype)]))
    if add is not None:  # the add's later readers take the kernel's sum; the add itself is left unused
        f.values[add] = f.emit(relax.op.reshape(f.emit(relax.TupleGetItem(out, 0)), lead + [d]))
    return f.emit(relax.op.reshape(f.emit(relax.TupleGetItem(out, 1)), lead + [d]))


def _gemm_input_order(f, low: CudaLowering, n: Node) -> str | None:
    """How the prefill GEMMs reading `n` want it: None (as it is, fp32) unless this function multiplies on
    tensor cores and every reader of `n` is a linear layer (or gated MLP) over weights of one kind; then fp16,
    in "storage" order (fp16 weights keep their decode GEMV's column order) or "natural" (dequantized
    weights). `cuda_linear` reads an fp16 input in that order."""
    users = low.users.get(n, [])
    if f.mode == "gemv" or not users or n in low.graph.outputs or int(n.type.shape[-1]) % 256:
        return None
    kinds = set()
    for u in users:
        if u.op not in ("linear", "gated_mlp") or u.inputs[0] is not n:
            return None
        kinds |= {w.op for w in u.inputs[1 : 2 if u.op == "linear" else 4]}
    return {frozenset({"param"}): "storage", frozenset({"qweight"}): "natural"}.get(frozenset(kinds))


def _fusable_add(f, low: CudaLowering, x: Node, norm: Node) -> bool:
    """`x` is a same-shape fp32 add whose other readers are not lowered yet (they will read the fused sum)."""
    if x.op != "add" or any(i.type.shape != x.type.shape or i.type.dtype != "float32" for i in x.inputs):
        return False
    if any(i.op in ("param", "const", "qweight") for i in x.inputs):
        return False
    return not any(u in f.values for u in low.users.get(x, []) if u is not norm)


@register_rule("cuda", "quant_act")
def _quant_act(f, n, xs):
    raise UnsupportedOpError(
        "quant_act (W8A8 activation quantization)",
        n.source,
        hint="target 'cuda' has weight-only int8/int4 kernels; build without --w8a8",
    )


# the attention rules register themselves on the op records when their module loads
from . import attention  # noqa: E402, F401
