"""Prefill attention on the CPU: kiln's fused paged kernel against unfused attention, SmolLM2's shape
(9 query heads, 3 KV heads, head_dim 64), one sequence of 512..4096 tokens.

    .venv/bin/python bench/attention.py [--lengths 512 1024 2048 4096]

- fused: `paged_attention_func` (online softmax over one page at a time; K/V appended to the paged
  cache first, as in the compiled model);
- unfused (TVM): matmul -> + causal mask -> softmax -> matmul in Relax, built by TVM's default pipeline
  (legalization + fusion): what lowering `sdpa` op by op gives; it materializes [heads, T, T] scores;
- unfused (torch): the same four ops in torch eager (MKL matmuls), for reference.

Each measurement runs in its own process: time is one call (after building); peak memory is the growth
of the process's peak resident set over the inputs (ru_maxrss), i.e. the working memory of the call.
TVM's unfused build (default schedules, no tuning) is slow, so it runs up to --tvm-max tokens only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

H, KVH, D, PS = 9, 3, 64, 16


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(variant: str, T: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, T, H, D), dtype=np.float32)
    k = rng.standard_normal((1, T, KVH, D), dtype=np.float32)
    v = rng.standard_normal((1, T, KVH, D), dtype=np.float32)
    if variant == "torch":
        import torch

        qt, kt, vt = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
        mask = torch.full((T, T), float("-inf")).triu(1)

        def call():
            kk, vv = kt.repeat_interleave(H // KVH, 1), vt.repeat_interleave(H // KVH, 1)
            s = torch.softmax(qt @ kk.transpose(-1, -2) * D**-0.5 + mask, -1)
            return s @ vv
    else:
        import tvm
        from tvm import relax

        from kiln.targets.cpu import kernels as ck

        bb = relax.BlockBuilder()
        tgt = ck.cpu_target()
        if variant == "fused":
            pages = -(-T // PS)
            qv = relax.Var("q", relax.TensorType([1, T, H, D], "float32"))
            kv = relax.Var("k", relax.TensorType([1, T, KVH, D], "float32"))
            vv = relax.Var("v", relax.TensorType([1, T, KVH, D], "float32"))
            cv = relax.Var("cache", relax.TensorType([pages, 2, KVH, PS, D], "float32"))
            pt = relax.Var("pt", relax.TensorType([1, pages], "int32"))
            pos = relax.Var("pos", relax.TensorType([1, T], "int32"))
            with bb.function("main", [qv, kv, vv, cv, pt, pos]):
                app = bb.add_func(ck.kv_append_func(KVH, D, PS), "kv_append")
                att = bb.add_func(ck.paged_attention_func(H, KVH, D, PS, D**-0.5), "paged_attention")
                with bb.dataflow():
                    c2 = bb.emit(relax.op.call_tir_inplace(app, [cv, kv, vv, pt, pos], [0], cv.ty))
                    o = bb.emit_output(
                        bb.emit(relax.call_tir(att, [qv, c2, pt, pos], relax.TensorType([1, T, H, D], "float32")))
                    )
                bb.emit_func_output(o)
            args = [
                q,
                k,
                v,
                np.zeros((pages, 2, KVH, PS, D), np.float32),
                np.arange(pages, dtype=np.int32)[None],
                np.arange(T, dtype=np.int32)[None],
            ]
        else:
            qv = relax.Var("q", relax.TensorType([1, H, T, D], "float32"))
            kv = relax.Var("k", relax.TensorType([1, KVH, T, D], "float32"))
            vv = relax.Var("v", relax.TensorType([1, KVH, T, D], "float32"))
            mv = relax.Var("mask", relax.TensorType([T, T], "float32"))
            with bb.function("main", [qv, kv, vv, mv]):
                with bb.dataflow():
                    kk = bb.emit(relax.op.repeat(kv, H // KVH, axis=1))
                    vr = bb.emit(relax.op.repeat(vv, H // KVH, axis=1))
                    s = bb.emit(relax.op.matmul(qv, bb.emit(relax.op.permute_dims(kk, [0, 1, 3, 2]))))
                    s = bb.emit(relax.op.add(bb.emit(relax.op.multiply(s, relax.const(np.float32(D**-0.5)))), mv))
                    o = bb.emit_output(bb.emit(relax.op.matmul(bb.emit(relax.op.nn.softmax(s, -1)), vr)))
                bb.emit_func_output(o)
            args = [
                q.transpose(0, 2, 1, 3).copy(),
                k.transpose(0, 2, 1, 3).copy(),
                v.transpose(0, 2, 1, 3).copy(),
                np.triu(np.full((T, T), -np.inf, np.float32), 1),
            ]
        vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tgt), tvm.cpu())
        targs = [tvm.runtime.tensor(a) for a in args]

        def call():
            return vm["main"](*targs)

    base = _rss_mb()
    t0 = time.perf_counter()
    call()
    return {"variant": variant, "tokens": T, "seconds": time.perf_counter() - t0, "peak_mb": max(_rss_mb() - base, 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--tvm-max", type=int, default=2048)
    ap.add_argument("--one", nargs=2, default=None)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]))))
        return
    res = {}
    for T in a.lengths:
        for variant in ("fused", "torch") + (("unfused",) if T <= a.tvm_max else ()):
            out = subprocess.run([sys.executable, __file__, "--one", variant, str(T)], capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("{")]
            if not line:
                raise SystemExit(f"{variant} at {T} failed:\n{out.stderr[-2000:]}")
            res[variant, T] = json.loads(line[-1])
            print(res[variant, T], file=sys.stderr, flush=True)
    threads = os.environ.get("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    print(f"\nprefill attention, 1 x T tokens, {H} heads / {KVH} KV heads, head_dim {D}, {threads} threads; one run\n")
    print(
        "| tokens | fused (kiln paged) | unfused (TVM) | unfused (torch) | unfused TVM / fused | torch / fused | "
        "peak MB fused | peak MB unfused TVM | peak MB torch | scores [H,T,T] fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for T in a.lengths:
        f, t = res["fused", T], res["torch", T]
        u = res.get(("unfused", T))
        ut = f"{u['seconds'] * 1e3:.1f} ms" if u else "-"
        ur = f"{u['seconds'] / f['seconds']:.2f}x" if u else "-"
        um = f"{u['peak_mb']:.1f}" if u else "-"
        print(
            f"| {T} | {f['seconds'] * 1e3:.1f} ms | {ut} | {t['seconds'] * 1e3:.1f} ms | {ur} | "
            f"{t['seconds'] / f['seconds']:.2f}x | {f['peak_mb']:.1f} | {um} | {t['peak_mb']:.1f} | "
            f"{H * T * T * 4 / 2**20:.0f} MB |"
        )


if __name__ == "__main__":
    main()
