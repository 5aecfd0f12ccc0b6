"""Fused paged attention (prefill and decode) against the reference ops, ALiBi, and the kernels' working set.

`tests/test_cpu_kernels.py` checks the fp32 kernel against a numpy formula at a few shapes; here the
oracle is the IR's own reference (`cached_attention_reference`, run in float64), over awkward shapes:
prompt lengths 1, 7, 129 and 1000, pages of 8 and 16, ragged batches (right padding), GQA ratios 1, 3
and 8, sliding windows, ALiBi, and the int8 KV cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx

from kiln.ops import alibi_bias, attention_reference, cached_attention_reference
from kiln.targets.cpu import kernels as ck
from kiln.targets.cpu import kv8 as cpu_kv8

TGT = ck.cpu_target()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def bloom_slopes(h: int) -> list[float]:
    """ALiBi slopes as Bloom makes them (geometric from 2^-8/n; n the closest power of two below h,
    the remaining heads interleaved from the next power's sequence)."""
    n = 2 ** int(np.floor(np.log2(h)))
    base = [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    extra = [2.0 ** (-4.0 * (i + 1) / n) for i in range(2 * (h - n))][::2]
    return base + extra[: h - n]


def _step_vm(
    H: int, KVH: int, D: int, PS: int, window: int, slopes: list[float] | None, int8: bool, softcap: float = 0.0
):
    """Relax `step(q, k, v, cache, [scales], page_table, positions)`: in-place append, then attention."""
    b, t = tirx.Var("b", "int64"), tirx.Var("t", "int64")
    npg, mp = tirx.Var("num_pages", "int64"), tirx.Var("max_pages", "int64")
    q = relax.Var("q", relax.TensorType([b, t, H, D], "float32"))
    k = relax.Var("k", relax.TensorType([b, t, KVH, D], "float32"))
    v = relax.Var("v", relax.TensorType([b, t, KVH, D], "float32"))
    cache = relax.Var("cache", relax.TensorType([npg, 2, KVH, PS, D], "int8" if int8 else "float32"))
    sc = relax.Var("scales", relax.TensorType([npg, 2, KVH, PS], "float32"))
    pt = relax.Var("page_table", relax.TensorType([b, mp], "int32"))
    pos = relax.Var("positions", relax.TensorType([b, t], "int32"))
    extra = [relax.const(np.asarray(slopes, np.float32), "float32")] if slopes is not None else []
    bb = relax.BlockBuilder()
    with bb.function("step", [q, k, v, cache] + ([sc] if int8 else []) + [pt, pos]):
        if int8:
            app = bb.add_func(cpu_kv8.kv_append_int8_func(KVH, D, PS), "kv_append_int8")
            att = bb.add_func(
                cpu_kv8.paged_attention_int8_func(
                    H, KVH, D, PS, D**-0.5, window, alibi=slopes is not None, softcap=softcap
                ),
                "attn",
            )
        else:
            app = bb.add_func(ck.kv_append_func(KVH, D, PS), "kv_append")
            att = bb.add_func(
                ck.paged_attention_func(H, KVH, D, PS, D**-0.5, window, alibi=slopes is not None, softcap=softcap),
                "attn",
            )
        with bb.dataflow():
            if int8:
                both = bb.emit(relax.op.call_tir_inplace(app, [cache, sc, k, v, pt, pos], [0, 1], [cache.ty, sc.ty]))
                ins = [q, bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1)), pt, pos]
            else:
                c2 = bb.emit(relax.op.call_tir_inplace(app, [cache, k, v, pt, pos], [0], cache.ty))
                ins = [q, c2, pt, pos]
            o = bb.emit(relax.call_tir(att, ins + extra, relax.TensorType([b, t, H, D], "float32")))
            out = bb.emit_output(o)
        bb.emit_func_output(out)
    return relax.VirtualMachine(tvm.compile(bb.get(), target=TGT), tvm.cpu())


CASES = {
    # name: (page, heads, kv_heads, head_dim, window, alibi, int8, prompt lengths of the ragged batch)
    "gqa3-len1000-p16": (16, 9, 3, 64, 0, False, False, [1000, 129]),
    "mqa8-alibi-p8": (8, 8, 1, 32, 0, True, False, [7, 1, 129]),
    "mha-window-alibi-p8": (8, 4, 4, 32, 5, True, False, [129, 7, 1]),
    "gqa3-window37-p16": (16, 6, 2, 16, 37, False, False, [129, 1]),
    "int8-mqa8-alibi-p16": (16, 8, 1, 32, 0, True, True, [7, 129]),
    "int8-gqa3-window-p8": (8, 9, 3, 64, 11, False, True, [129, 1]),
    "gqa2-window-softcap-p8": (8, 4, 2, 32, 9, False, False, [129, 7, 1]),
    "int8-alibi-softcap-p16": (16, 4, 4, 16, 0, True, True, [33, 1]),
}
SOFTCAP = {"gqa2-window-softcap-p8": 1.5, "int8-alibi-softcap-p16": 2.0}  # Gemma-2's tanh cap of the scores


@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_matches_reference(case: str) -> None:
    PS, H, KVH, D, window, use_alibi, int8, lens = CASES[case]
    slopes = bloom_slopes(H) if use_alibi else None
    cap = SOFTCAP.get(case, 0.0)
    vm = _step_vm(H, KVH, D, PS, window, slopes, int8, cap)
    rng = np.random.default_rng(sum(lens) + H)
    B, T = len(lens), max(lens)
    total = max(lens) + 1
    max_pages = -(-total // PS) + 1
    num_pages = B * max_pages + 3
    page_table = rng.permutation(num_pages).astype(np.int32)[: B * max_pages].reshape(B, max_pages)
    cache_np = np.zeros((num_pages, 2, KVH, PS, D), np.int8 if int8 else np.float32)
    scales_np = np.zeros((num_pages, 2, KVH, PS), np.float32)
    cache, scales = tvm.runtime.tensor(cache_np), tvm.runtime.tensor(scales_np)
    # the reference keeps its own cache: float64 for fp32 (the oracle), float32 codes+scales for int8
    rdt = torch.float32 if int8 else torch.float64
    rcache = torch.zeros(cache_np.shape, dtype=torch.int8 if int8 else rdt)
    rscales = torch.zeros(scales_np.shape) if int8 else None
    pt_t = torch.from_numpy(page_table)

    def step(q, k, v, pos):
        args = [q, k, v, cache] + ([scales] if int8 else []) + [tvm.runtime.tensor(page_table), pos]
        out = vm["step"](*[tvm.runtime.tensor(a) if isinstance(a, np.ndarray) else a for a in args]).numpy()
        ref = cached_attention_reference(
            *(torch.from_numpy(x).to(rdt).permute(0, 2, 1, 3) for x in (q, k, v)),
            rcache,
            pt_t,
            torch.from_numpy(pos),
            rscales,
            D**-0.5,
            window,
            alibi=slopes,
            softcap=cap,
        )
        return out, ref.permute(0, 2, 1, 3).numpy()

    # prefill of a ragged batch: shorter sequences are right-padded with position -1
    q = rng.standard_normal((B, T, H, D), dtype=np.float32)
    k = rng.standard_normal((B, T, KVH, D), dtype=np.float32)
    v = rng.standard_normal((B, T, KVH, D), dtype=np.float32)
    pos = np.full((B, T), -1, np.int32)
    for i, n in enumerate(lens):
        pos[i, :n] = np.arange(n)
    out, ref = step(q, k, v, pos)
    assert rel_err(out, ref) < 1e-5, case
    for i, n in enumerate(lens):
        assert np.all(out[i, n:] == 0), "padding queries must produce zeros"
    # decode: one token per sequence over the same cache tensor
    dq = rng.standard_normal((B, 1, H, D), dtype=np.float32)
    dk = rng.standard_normal((B, 1, KVH, D), dtype=np.float32)
    dv = rng.standard_normal((B, 1, KVH, D), dtype=np.float32)
    out, ref = step(dq, dk, dv, np.array([[n] for n in lens], np.int32))
    assert rel_err(out, ref) < 1e-5, case


def _allocations(stmt) -> list[list]:
    """Shapes of every buffer a TIR body allocates."""
    out = []
    if type(stmt).__name__ == "AllocBuffer":
        out.append(list(stmt.buffer.shape))
    for field in ("body", "seq", "then_case", "else_case", "block", "stmts"):
        child = getattr(stmt, field, None)
        if child is None:
            continue
        for c in child if type(child).__name__ in ("Array", "list", "tuple") else [child]:
            out += _allocations(c)
    return out


@pytest.mark.parametrize("alibi", [False, True])
def test_prefill_working_memory_does_not_grow_with_tokens(alibi: bool) -> None:
    # The same kernel serves prefill (t = prompt length) and decode. Every buffer it allocates has a
    # constant size (head_dim, page size, vector lanes): nothing of size tokens or tokens^2.
    for func in (
        ck.paged_attention_func(9, 3, 64, 16, 0.125, 0, alibi=alibi),
        cpu_kv8.paged_attention_int8_func(9, 3, 64, 16, 0.125, 0, alibi=alibi),
    ):
        allocs = _allocations(func.body)
        assert allocs, "expected the kernel's scratch buffers"
        for shape in allocs:
            assert all(isinstance(d, tvm.tirx.IntImm) for d in shape), shape
        assert sum(int(np.prod([int(d) for d in s])) for s in allocs) * 4 <= 1024


def test_alibi_reference_ops_agree() -> None:
    # attention (full sequence) and cached_attention (paged, filled by one prefill) give the same
    # result with ALiBi, and both equal softmax(q k^T * scale + slope * (j - i)) over the causal part.
    torch.manual_seed(0)
    B, H, KVH, T, D = 2, 6, 2, 19, 8
    slopes = bloom_slopes(H)
    q, k, v = (
        torch.randn(B, H, T, D, dtype=torch.float64),
        torch.randn(B, KVH, T, D, dtype=torch.float64),
        torch.randn(B, KVH, T, D, dtype=torch.float64),
    )
    full = attention_reference(q, k, v, 0.3, alibi=slopes)
    kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    i = torch.arange(T)
    s = q @ kk.transpose(-1, -2) * 0.3 + alibi_bias(slopes, i, i, torch.float64)
    s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
    torch.testing.assert_close(full, torch.softmax(s, -1) @ vv, rtol=1e-10, atol=1e-10)
    cache = torch.zeros(8, 2, KVH, 8, D, dtype=torch.float64)
    pt = torch.tensor([[0, 1, 2], [5, 4, 3]], dtype=torch.int32)
    pos = torch.arange(T, dtype=torch.int32)[None].repeat(B, 1)
    paged = cached_attention_reference(q, k, v, cache, pt, pos, scale=0.3, alibi=slopes)
    torch.testing.assert_close(paged, full, rtol=1e-10, atol=1e-10)
    # the bias changes the answer (the option is not silently ignored)
    assert (attention_reference(q, k, v, 0.3) - full).abs().max() > 1e-3


# -- compiled programs against the interpreter --------------------------------------------------------


def compiled_vs_interpreter(graph, prompt: list[int], steps: int = 2, page_size_pages: int = 8) -> float:
    """Build a kv-cached graph for the CPU, prefill `prompt` then decode `steps` tokens (greedy from the
    compiled logits) through both the compiled program and the reference interpreter on the same
    graph; returns the worst relative error of the logits."""
    import kiln.interp as interp
    from kiln.targets.common.layouts import materialize
    from kiln.targets.cpu.target import CpuTarget

    build = CpuTarget().build(graph)
    vm = relax.VirtualMachine(build.executable, tvm.cpu())
    weights = tuple(tvm.runtime.tensor(materialize(s, graph.params)) for s in build.weight_specs)
    kv = graph.meta["kv_cache"]
    ps = kv["page_size"]
    shape = lambda t: tuple(page_size_pages if d == "pages" else int(d) for d in t["shape"])
    caches = tuple(tvm.runtime.tensor(np.zeros(shape(t), t["dtype"])) for t in kv["tensors"])
    rcaches = {t["name"]: torch.zeros(shape(t), dtype=getattr(torch, t["dtype"])) for t in kv["tensors"]}
    pages = np.arange(page_size_pages, dtype=np.int32)[None, : -(-(len(prompt) + steps) // ps)]
    worst, ids, start = 0.0, list(prompt), 0
    for s in range(steps + 1):
        chunk = ids[start:]
        x = np.asarray([chunk], np.int64)
        pos = np.arange(start, start + len(chunk), dtype=np.int32)[None]
        fn = "prefill" if s == 0 else "decode"
        out = vm[fn](tvm.runtime.tensor(x), tvm.runtime.tensor(pos), tvm.runtime.tensor(pages), caches, weights).numpy()
        ref = interp.run(
            graph,
            {
                "input_ids": torch.from_numpy(x),
                "positions": torch.from_numpy(pos),
                "page_table": torch.from_numpy(pages),
                **rcaches,
            },
        )[0].numpy()
        worst = max(worst, rel_err(out[0, -1], ref[0, -1]))
        start = len(ids)
        ids.append(int(out[0, -1].argmax()))
    return worst


def test_alibi_compiles_end_to_end(traced) -> None:
    # No model in the tiny zoo uses ALiBi (Bloom's attention is not recognized by fuse-attention: its
    # bias is built from the attention-mask input), so ALiBi slopes are set on the recognized attention
    # ops of the tiny Llama: the cached op, its lowering and the kernel must carry them through.
    import kiln

    g, _ = kiln.run_pipeline(traced["llama"], "canonicalize,fuse-norms,fuse-rope,fuse-attention,fuse-mlp")
    heads = int(g.find("attention")[0].type.shape[1])
    plain, _ = kiln.run_pipeline(g, "kv-cache{page_size=8}")
    for a in g.find("attention"):
        a.attrs["alibi"] = bloom_slopes(heads)
    g, _ = kiln.run_pipeline(g, "kv-cache{page_size=8},canonicalize")
    assert all(c.attrs.get("alibi") == bloom_slopes(heads) for c in g.find("cached_attention"))
    assert compiled_vs_interpreter(g, [5, 9, 3, 77, 12, 40, 41, 2, 8, 1, 90], steps=2) < 1e-4
    # and ALiBi changes the logits relative to the same graph without it
    import kiln.interp as interp

    inputs = lambda: {
        "input_ids": torch.tensor([[5, 9, 3, 77, 12, 40, 41, 2, 8, 1, 90]]),
        "positions": torch.arange(11, dtype=torch.int32)[None],
        "page_table": torch.tensor([[0, 1]], dtype=torch.int32),
        **{t["name"]: torch.zeros(4, *[int(d) for d in t["shape"][1:]]) for t in g.meta["kv_cache"]["tensors"]},
    }
    assert (interp.run(g, inputs())[0] - interp.run(plain, inputs())[0]).abs().max() > 1e-3
