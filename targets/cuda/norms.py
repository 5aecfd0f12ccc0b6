"""RMSNorm on the GPU as one kernel, with the residual add that precedes it folded in.

The generic rule gives three kernels per norm (x*x, a mean, then the scaling), and the residual add before
it a fourth: at batch-1 decode each is a launch of a few microseconds over 16 KB, 128 of them per step of
an 8B model. Here one block per row reads the row once (h = a + b when fused, written back for the next
residual), reduces the sum of squares with warp shuffles and a shared-memory pass, and writes
y = h * rsqrt(mean(h^2) + eps) * w.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .kernels import storage_position


def rms_norm_func(d: int, eps: float, residual: bool, out_dtype: str = "float32", storage_order: bool = False):
    """y[m, d] = norm(x) * w, x = a (+ b when `residual`, also written to h). d must be a multiple of 4.

    Before the prefill GEMMs y is written as the GEMM reads it: fp16 (`out_dtype`), and for fp16 weights in
    their lane-interleaved column order (`storage_order`, targets/cuda/layouts.py), which keeps runs of 4
    columns together: no cast or column permutation kernel between the norm and its GEMMs."""
    if d % 4:
        raise ValueError(f"the cuda RMSNorm kernel needs a row size that is a multiple of 4, got {d}")
    THREADS = min(1024, 32 * -(-d // 128))  # one 4-wide load per thread up to d = 4096: short latency chain
    IT = -(-d // (THREADS * 4))  # 4-wide loads per thread
    NW = THREADS // 32
    inv_d = 1.0 / d

    def out_col(c):  # c: the first of 4 natural columns
        return storage_position(c, 16) if storage_order else c

    @T.prim_func(private=True)
    def norm(var_a: T.handle, var_b: T.handle, w: T.Buffer((d,), "float32"), var_h: T.handle, var_y: T.handle):  # type: ignore[valid-type]
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        a = T.match_buffer(var_a, (m, d), "float32")
        b = T.match_buffer(var_b, (m, d) if residual else (1, 1), "float32")
        h = T.match_buffer(var_h, (m, d) if residual else (1, 1), "float32")
        y = T.match_buffer(var_y, (m, d), out_dtype)
        for row in T.thread_binding(m, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                xl = T.alloc_buffer((IT * 4,), "float32", scope="local")
                red = T.alloc_buffer((1,), "float32", scope="local")
                part = T.alloc_buffer((NW,), "float32", scope="shared")
                red[0] = T.float32(0)
                for it in T.unroll(IT):
                    if (it * THREADS + tx) * 4 < d:
                        for j in T.vectorized(4):
                            xl[it * 4 + j] = a[row, (it * THREADS + tx) * 4 + j] + (
                                b[row, (it * THREADS + tx) * 4 + j] if residual else T.float32(0)
                            )
                        if residual:
                            for j in T.vectorized(4):
                                h[row, (it * THREADS + tx) * 4 + j] = xl[it * 4 + j]
                        for j in T.unroll(4):
                            red[0] = red[0] + xl[it * 4 + j] * xl[it * 4 + j]
                for sh in T.unroll(5):
                    red[0] = red[0] + T.tvm_warp_shuffle_xor(
                        T.tvm_warp_activemask(), red[0], T.shift_left(1, sh), 32, 32
                    )
                if tx % 32 == 0:
                    part[tx // 32] = red[0]
                T.tvm_storage_sync("shared")
                red[0] = T.float32(0)
                for i in T.unroll(NW):
                    red[0] = red[0] + part[i]
                red[0] = T.rsqrt(red[0] * T.float32(inv_d) + T.float32(eps))
                for it in T.unroll(IT):
                    if (it * THREADS + tx) * 4 < d:
                        for j in T.vectorized(4):
                            y[row, out_col((it * THREADS + tx) * 4) + j] = T.Cast(
                                out_dtype, xl[it * 4 + j] * red[0] * w[(it * THREADS + tx) * 4 + j]
                            )

    return norm
