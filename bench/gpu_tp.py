"""Tensor parallelism on GPUs: a model over 2 GPUs beside the same model on one, in one process tree.

Build the artifacts on any host with TVM's compiler (no GPU, no weights: shapes only):

    python bench/gpu_tp.py build OUT_DIR

then on a host with 2 GPUs (TVM's runtime only; each rank makes its own seeded random weights in its
fields' shapes on its GPU, so a 70B model never exists whole anywhere):

    python bench/gpu_tp.py run OUT_DIR --json results.json

and back here, the goal figures into bench/results/gpu_tp.json:

    python bench/gpu_tp.py summarize results.json --machine "..." --command "..."

Reports: Llama-3.1-8B shape fp16, batch-1 decode and batch-64 throughput on 2 GPUs over 1 GPU; Llama-3.1-70B
shape (fp16 and int4) batch-1 decode on 2 GPUs against the two cards' bandwidth roofline (each rank streams
its half of the weights at the measured copy bandwidth of its GPU); the collectives' share of a step, measured
by running the same steps with the collectives skipped (KILN_TP_DRY_COLLECTIVES=1: wrong numbers, the step's
time without its exchanges) and with every sum through NCCL (KILN_TP_ALLREDUCE=nccl) instead of the
peer-memory all-reduce; and NCCL's own all-reduce latency and bus bandwidth on the pair (torch.distributed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_decode import SHAPES  # noqa: E402  (with the 70B shape)

# (model, variant, ranks): the single-GPU 8B build is the baseline the 2-GPU one is compared with
BUILDS = [
    ("llama-3.1-8b", "fp16", 1),
    ("llama-3.1-8b", "fp16", 2),
    ("llama-3.1-70b", "fp16", 2),
    ("llama-3.1-70b", "int4", 2),
]
VARIANTS = {"fp16": {}, "int4": {"quant": "int4_g128"}}
MAX_CONTEXT = 4096


def name(model: str, variant: str, ranks: int) -> str:
    return f"{model}-{variant}-tp{ranks}"


def build(out: str, only: list[str] | None = None) -> None:
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    import kiln

    for model, variant, ranks in BUILDS:
        path = os.path.join(out, name(model, variant, ranks))
        if only and name(model, variant, ranks) not in only:
            continue
        cfg = LlamaConfig(**SHAPES[model])
        cfg._attn_implementation = "sdpa"
        with init_empty_weights():
            m = LlamaForCausalLM(cfg).eval()
        t = time.perf_counter()
        kiln.compile(
            m, target="cuda", max_context=MAX_CONTEXT, pack_weights=False, tensor_parallel=ranks, **VARIANTS[variant]
        ).save(path)
        print(f"built {path} in {time.perf_counter() - t:.1f} s", flush=True)


# -- on the GPUs ------------------------------------------------------------------------------------


def random_field_weights(manifest: dict, device: Any) -> dict[str, Any]:
    """Seeded random values for every weight field of this rank, made on its GPU in the field's shape and
    dtype (speed does not depend on the values; norms get ones, fp16 weights N(0, 0.02), codes uniform)."""
    import torch

    rank = int((manifest.get("tensor_parallel") or {}).get("rank", 0))
    g = torch.Generator(device=f"cuda:{device.index}").manual_seed(1000 + rank)
    out = {}
    with torch.device(f"cuda:{device.index}"):
        for spec in manifest["weights"]:
            shape, dt = tuple(spec["shape"]), getattr(torch, spec["dtype"])
            if dt in (torch.float16, torch.float32, torch.bfloat16):
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=dt)
                else:
                    t = (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(dt)
            else:
                info = torch.iinfo(dt)
                t = torch.randint(
                    max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=g, dtype=torch.int64
                )
                t = t.to(dt)
            out[spec["name"]] = t.contiguous()
    torch.cuda.synchronize(device.index)
    return out


def nccl_pair(sizes: list[int]) -> dict[str, Any]:
    """NCCL's own all-reduce on the 2 GPUs (torch.distributed, 2 processes): latency at `sizes` bytes of
    fp32 inside CUDA graphs, and the bus bandwidth at 256 MB."""
    import subprocess

    code = r"""
import os, sys, json, time, torch, torch.distributed as dist
r = int(sys.argv[1]); sizes = json.loads(sys.argv[2])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", NCCL_NVLS_ENABLE="0")
torch.cuda.set_device(r); dist.init_process_group("nccl", rank=r, world_size=2)
out = {}
s = torch.cuda.Stream()
for n in sizes:
    x = torch.ones(n // 4, device="cuda")
    with torch.cuda.stream(s):
        for _ in range(3): dist.all_reduce(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for _ in range(100): dist.all_reduce(x)
    for _ in range(3): g.replay()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): g.replay()
    torch.cuda.synchronize(); out[str(n)] = (time.perf_counter() - t) / 1000 * 1e6
big = torch.ones(64 << 20, device="cuda")
for _ in range(3): dist.all_reduce(big)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): dist.all_reduce(big)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
out["busbw_256mb_gbs"] = big.numel() * 4 * 2 * (2 - 1) / 2 / dt / 1e9
if r == 0: print("NCCLPAIR " + json.dumps(out), flush=True)
dist.destroy_process_group()
"""
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(r), json.dumps(sizes)], stdout=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    res: dict[str, Any] = {}
    for p in procs:
        o, _ = p.communicate(timeout=300)
        for line in o.splitlines():
            if line.startswith("NCCLPAIR "):
                res = json.loads(line[9:])
    return {
        "allreduce_us": {k: v for k, v in res.items() if k.isdigit()},
        "busbw_256mb_gbs": res.get("busbw_256mb_gbs"),
    }


def run(art: str, json_out: str | None, only: list[str] | None, new: int, context: int) -> dict[str, Any]:
    import gpu_tp
    from fixed_batch import decode_throughput
    from gpu_decode import copy_bandwidth
    from gpu_prefill import gemm_rate

    from kiln.runtime.engine import Engine

    bw, rate = copy_bandwidth(), gemm_rate()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, fp16 GEMM {rate / 1e12:.0f} TFLOP/s", flush=True)
    results: dict[str, Any] = {"bandwidth_tb_s": bw / 1e12, "gemm_tflops": rate / 1e12, "runs": {}}
    for model, variant, ranks in BUILDS:
        key = name(model, variant, ranks)
        if only and key not in only:
            continue
        batches = [1, 64] if model == "llama-3.1-8b" else [1]
        runs: dict[str, Any] = {}
        parts = [("real", {})]
        if ranks > 1 and model == "llama-3.1-8b":  # NCCL for every sum, and no sums at all
            parts += [("nccl", {"KILN_TP_ALLREDUCE": "nccl"}), ("dry", {"KILN_TP_DRY_COLLECTIVES": "1"})]
        for part, env in parts:
            os.environ.update(env)
            print(f"{key} ({part})", flush=True)
            t = time.perf_counter()
            eng = Engine(
                os.path.join(art, key),
                kv_cache_tokens=max(batches) * (context + 64),
                weights=gpu_tp.random_field_weights,
                verify=False,
            )
            load = time.perf_counter() - t
            r = decode_throughput(eng, batches, context, new, bw, rate * ranks)
            r["load_s"] = load
            r["peer_memory_sums"] = getattr(eng.collectives, "p2p", None) is not None
            eng.close()
            for k in env:
                os.environ.pop(k)
            runs[part] = r
        results["runs"][key] = runs
        if json_out:
            with open(json_out, "w") as f:
                json.dump(results, f, indent=1)
    if not only or "nccl" in only:
        sizes = [4 * 4096, 4 * 8192, 64 * 4 * 4096]
        results["nccl"] = nccl_pair(sizes)
        print(f"NCCL on the pair: {results['nccl']}", flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def summarize(run_json: str, machine: str, command: str) -> str:
    from results_io import write_results

    with open(run_json) as f:
        r = json.load(f)
    runs = r["runs"]

    def tok(key: str, batch: int, part: str = "real") -> float:
        return runs[key][part][f"batch{batch}"]["decode_tok_s"]

    out: dict[str, Any] = {
        "tp2_over_tp1_batch1_8b": tok("llama-3.1-8b-fp16-tp2", 1) / tok("llama-3.1-8b-fp16-tp1", 1),
        "tp2_over_tp1_batch64_8b": tok("llama-3.1-8b-fp16-tp2", 64) / tok("llama-3.1-8b-fp16-tp1", 64),
        "roofline_share_70b_tp2": runs["llama-3.1-70b-fp16-tp2"]["real"]["batch1"]["share_of_floor"],
        "roofline_share_70b_int4_tp2": runs["llama-3.1-70b-int4-tp2"]["real"]["batch1"]["share_of_floor"],
    }
    for key, v in runs.items():
        for part, rr in v.items():
            for b in (1, 64):
                if f"batch{b}" in rr:
                    x = rr[f"batch{b}"]
                    out[f"{key}_{part}_batch{b}_tok_s"] = x["decode_tok_s"]
                    out[f"{key}_{part}_batch{b}_step_ms"] = x["step_ms"]
                    out[f"{key}_{part}_batch{b}_floor_ms"] = x["floor_ms"]
    for key in runs:
        if "dry" in runs[key]:
            for part in ("real", "nccl"):
                for b in (1, 64):
                    if f"batch{b}" in runs[key][part]:
                        out[f"{key}_{part}_collectives_ms_batch{b}"] = (
                            runs[key][part][f"batch{b}"]["step_ms"] - runs[key]["dry"][f"batch{b}"]["step_ms"]
                        )
    out["nccl"] = r.get("nccl")
    out["bandwidth_tb_s"], out["gemm_tflops"] = r["bandwidth_tb_s"], r["gemm_tflops"]
    out["command"] = command
    return write_results("gpu_tp", out, on=machine)  # the GPU host, not this one


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out")
    b.add_argument("--only", default="")
    r = sub.add_parser("run")
    r.add_argument("art")
    r.add_argument("--json")
    r.add_argument("--only", default="")
    r.add_argument("--new", type=int, default=64)
    r.add_argument("--context", type=int, default=512)
    s = sub.add_parser("summarize")
    s.add_argument("run_json")
    s.add_argument("--machine", required=True)
    s.add_argument("--command", required=True)
    a = ap.parse_args(argv)
    only = [x for x in getattr(a, "only", "").split(",") if x]
    if a.cmd == "build":
        build(a.out, only)
    elif a.cmd == "run":
        run(a.art, a.json, only, a.new, a.context)
    else:
        print(summarize(a.run_json, a.machine, a.command))


if __name__ == "__main__":
    main()
