"""GPU prefill benchmark: time to first token against the compute floor, the fused attention kernel alone
against the card's GEMM rate and torch's flash kernel, and chunked against one-shot prefill of a long prompt.

On a host with TVM's compiler (no GPU): the attention kernel as a module of its own, and the 8B artifact
(shapes only, no weights) with room for a 32k-token prompt:

    python bench/gpu_prefill.py build OUT_DIR

on the GPU host (TVM's runtime only; weights made there, seeded, in the real shapes):

    python bench/gpu_prefill.py run OUT_DIR [--json run.json]

and back here, the goal figures into bench/results/gpu_prefill.json:

    python bench/gpu_prefill.py summarize run.json --machine "..." --command "..."

Floors: the card's own rate for a large fp16 matrix product (8192^3, measured in the same run) against
2 x (parameters the prompt passes through) x tokens plus causal attention's 2 x 2 x layers x heads x
head_dim x tokens^2 / 2 FLOPs. The attention kernel is timed alone on Llama-3.1-8B's attention shape (32
query heads, 8 KV heads, head_dim 128, 16-token pages, causal), beside torch's scaled_dot_product_attention
(flash backend) on the same tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gpu_decode as G  # noqa: E402  (the shapes, the seeded weights and the artifact build are shared)

MODEL = "llama-3.1-8b"
HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
LENGTHS = (2048, 8192, 32768)
CHUNK = 2048
MAX_CONTEXT = 32768 + 256
KERNEL = "flash-h32-kv8-d128-p16.so"


def build(out: str) -> None:
    import tvm

    from kiln.targets.cuda.flash import flash_func
    from kiln.targets.cuda.target import CudaTarget

    os.makedirs(out, exist_ok=True)
    f = flash_func(HEADS, KV_HEADS, HEAD_DIM, PAGE, HEAD_DIM**-0.5).with_attr("global_symbol", "flash")
    CudaTarget().compile_module(tvm.IRModule({"flash": f})).export_library(os.path.join(out, KERNEL))
    G.build(out, [MODEL], ["fp16"], max_context=MAX_CONTEXT)
    # the previous prefill attention (pages gathered, two GEMMs around the softmax), for TTFT side by side
    G.build(os.path.join(out, "gathered"), [MODEL], ["fp16"], target_options={"prefill_attention": "gathered"})


# -- on the GPU -------------------------------------------------------------------------------------


def _time(fn, reps: int = 5) -> float:
    """Fastest of `reps` runs after a warm-up, seconds."""
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_rate() -> float:
    """FLOP/s of an 8192^3 fp16 matrix product (cuBLAS through torch)."""
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    return 2 * n**3 / _time(lambda: a @ b, reps=10)


def attention_alone(art: str, rate: float) -> dict:
    """The fused kernel and torch's flash SDPA on one prompt of each length: seconds, TFLOP/s, share of
    the GEMM rate, and the largest difference between their outputs."""
    import torch
    import tvm

    from kiln.runtime import cuda as kc

    dev = kc.prepare({"target": {"arch": "sm_90a", "compute_capability": "9.0"}})
    fn = tvm.runtime.load_module(os.path.join(art, KERNEL))["flash"]
    tv = tvm.runtime.from_dlpack
    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in LENGTHS:
        q = torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", generator=g)
        k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", generator=g, dtype=torch.float16)
        v = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", generator=g, dtype=torch.float16)
        pages = n // PAGE
        # cache [pages, 2, kv_heads, page, head_dim], sequence's pages in order
        cache = torch.stack([k, v], 1)[0].reshape(2, KV_HEADS, pages, PAGE, HEAD_DIM).permute(2, 0, 1, 3, 4)
        cache = cache.contiguous()
        pt = torch.arange(pages, device="cuda", dtype=torch.int32)[None]
        pos = torch.arange(n, device="cuda", dtype=torch.int32)[None]
        o = torch.empty(1, HEADS, n, HEAD_DIM, device="cuda")
        args = [tv(x) for x in (q, cache, pt, pos, o)]
        t_kiln = _time(lambda: fn(*args))
        q16 = q.half()
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            ref = torch.nn.functional.scaled_dot_product_attention(q16, k, v, is_causal=True, enable_gqa=True)
            t_torch = _time(
                lambda: torch.nn.functional.scaled_dot_product_attention(q16, k, v, is_causal=True, enable_gqa=True)
            )
        flops = 4 * HEADS * HEAD_DIM * n * (n + 1) / 2
        out[str(n)] = {
            "kiln_s": t_kiln,
            "torch_flash_s": t_torch,
            "kiln_tflops": flops / t_kiln / 1e12,
            "torch_flash_tflops": flops / t_torch / 1e12,
            "kiln_share_of_gemm": flops / t_kiln / rate,
            "torch_share_of_gemm": flops / t_torch / rate,
            "max_abs_diff": float((o - ref.float()).abs().max()),
        }
        r = out[str(n)]
        print(
            f"  attention {n:6d} tokens: kiln {r['kiln_tflops']:6.1f} TFLOP/s ({100 * r['kiln_share_of_gemm']:.0f}% of "
            f"GEMM)  torch flash {r['torch_flash_tflops']:6.1f} ({100 * r['torch_share_of_gemm']:.0f}%)  "
            f"max |diff| {r['max_abs_diff']:.2e}",
            flush=True,
        )
    del dev
    return out


def prefill_times(art: str, rate: float) -> dict:
    """TTFT at 128 and 2048 tokens against the floor (and through the gathered attention of the same
    model), and a 32k prompt one-shot and in 2k chunks."""
    import torch

    from kiln.runtime.engine import Engine
    from kiln.targets.cuda.weights import WeightMaker, tensors_of

    cfg = G._config(MODEL)
    model = G.seeded_model(cfg)
    path = os.path.join(art, f"{MODEL}-fp16")
    man = json.load(open(os.path.join(path, "manifest.json")))
    weights = WeightMaker(tensors_of(model)).all(man)
    body = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size  # the untied table
    del model
    torch.cuda.empty_cache()
    gathered = os.path.join(art, "gathered", f"{MODEL}-fp16")
    eng = Engine(gathered, kv_cache_tokens=4096, weights=weights, verify=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (max(LENGTHS),), generator=g).tolist()
    layers, heads, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim

    def floor(n: int) -> float:
        return (2 * body * n + 4 * layers * heads * hd * n * (n + 1) / 2) / rate

    def prefill(n: int, chunk: int) -> float:
        pages = eng.pool.alloc(eng.pool.pages_for(n))
        try:
            best = float("inf")
            for _ in range(2):
                t = time.perf_counter()
                for s in range(0, n, chunk):
                    eng.prefill(prompt[s : min(n, s + chunk)], pages, start=s)
                best = min(best, time.perf_counter() - t)
            return best
        finally:
            eng.pool.release(pages)

    out: dict = {}
    for n in (128, 2048):
        out[f"ttft_{n}_gathered_s"] = t = prefill(n, n)
        print(f"  TTFT {n:5d} tokens, gathered attention: {1e3 * t:8.1f} ms", flush=True)
    eng.close()
    eng = Engine(path, kv_cache_tokens=max(LENGTHS) + 256, weights=weights, verify=False)
    for n in (128, 2048):
        t = prefill(n, n)
        out[f"ttft_{n}_s"] = t
        out[f"ttft_{n}_floor_s"] = floor(n)
        out[f"ttft_{n}_over_floor"] = t / floor(n)
        print(f"  TTFT {n:5d} tokens: {1e3 * t:8.1f} ms, floor {1e3 * floor(n):7.1f} ms: {t / floor(n):.2f}x")
    n = max(LENGTHS)
    one, chunked = prefill(n, n), prefill(n, CHUNK)
    out.update(
        {
            "prefill_32k_oneshot_s": one,
            "prefill_32k_chunked_s": chunked,
            "chunked_32k_over_oneshot": chunked / one,
            "prefill_32k_floor_s": floor(n),
        }
    )
    print(f"  32k prompt: one shot {one:.3f} s, in {CHUNK}-token chunks {chunked:.3f} s ({chunked / one:.3f}x)")
    eng.close()
    return out


def run(art: str, json_path: str | None) -> dict:
    import torch

    rate = gemm_rate()
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}; fp16 GEMM 8192^3: {rate / 1e12:.0f} TFLOP/s", flush=True)
    res = {"gpu": gpu, "gemm_flops": rate, "attention": attention_alone(art, rate)}
    if json_path:
        json.dump(res, open(json_path, "w"), indent=1)
    res["prefill"] = prefill_times(art, rate)
    if json_path:
        json.dump(res, open(json_path, "w"), indent=1)
    return res


def summarize(run_json: str, machine: str, command: str) -> str:
    """The goal figures of a run's --json into bench/results/gpu_prefill.json (the GPU host as `machine`)."""
    from results_io import write_results

    r = json.load(open(run_json))
    a8k, p = r["attention"]["8192"], r["prefill"]
    figures = {
        "command": command,
        "gpu": r["gpu"],
        "model": f"{MODEL} shape, seeded random weights, fp16",
        "gemm_tflops": r["gemm_flops"] / 1e12,
        "ttft_2048_over_floor_8b": p["ttft_2048_over_floor"],
        "ttft_128_over_floor_8b": p["ttft_128_over_floor"],
        "attention_share_of_gemm_8k": a8k["kiln_share_of_gemm"],
        "torch_flash_share_of_gemm_8k": a8k["torch_share_of_gemm"],
        "chunked_32k_over_oneshot": p["chunked_32k_over_oneshot"],
        "goals": {
            "ttft_2048_over_floor_8b": "<= 1.5",
            "attention_share_of_gemm_8k": ">= 0.5",
            "chunked_32k_over_oneshot": "<= 1.15",
        },  # fmt: skip
        "attention": r["attention"],
        "prefill": p,
    }
    return write_results("gpu_prefill", figures, on=machine)  # the GPU host, not this one


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out")
    r = sub.add_parser("run")
    r.add_argument("art")
    r.add_argument("--json")
    s = sub.add_parser("summarize")
    s.add_argument("run_json")
    s.add_argument("--machine", required=True)
    s.add_argument("--command", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "build":
        build(a.out)
    elif a.cmd == "run":
        run(a.art, a.json)
    else:
        print(summarize(a.run_json, a.machine, a.command))


if __name__ == "__main__":
    main()
