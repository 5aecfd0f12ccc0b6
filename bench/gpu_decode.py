"""GPU decode benchmark: kiln's cuda target against transformers eager and torch.compile, one process.

Build the artifacts on any host with TVM's compiler (no GPU, no weights: shapes only):

    python bench/gpu_decode.py build OUT_DIR

then on the GPU host (TVM's runtime only; weights are made there, seeded, in the real shapes):

    python bench/gpu_decode.py run OUT_DIR [--models llama-3.2-1b,llama-3.1-8b] [--json results.json]

and back here, the goal figures into bench/results/gpu_decode.json:

    python bench/gpu_decode.py summarize results.json --machine "..." --command "..."

Reports, for Llama-3.2-1B- and Llama-3.1-8B-shaped models with random weights: batch-1 decode
tokens/s and its share of the bandwidth roofline (measured device copy bandwidth / bytes read per
token), time to first token at 128 and 2048 prompt tokens against the dense fp16 compute roofline,
and decode throughput at batch 8, 32 and 64. KILN_PROFILE=1 adds a per-kernel table of a decode step;
KILN_CROSSOVER=1,2,4,8,16 adds decode tok/s at those batch sizes through the GEMV and the GEMM entry points
(where the target's `gemv_max_batch` belongs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        head_dim=64,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        head_dim=128,
    ),
}
SHAPES["llama-3.1-70b"] = dict(  # bench/gpu_tp.py: over 2 GPUs (its fp16 weights fill one H200)
    SHAPES["llama-3.1-8b"], hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
)
VARIANTS = {"fp16": {}, "int8": {"quant": "int8"}, "int4": {"quant": "int4_g128"}}
MAX_CONTEXT = 4096
PEAK_FP16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense tensor-core FLOP/s, vendor data sheets


def _config(name: str):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SHAPES[name])
    cfg._attn_implementation = "sdpa"
    return cfg


def build(
    out: str,
    models: list[str],
    variants: list[str],
    target_options: dict | None = None,
    max_context: int = MAX_CONTEXT,
) -> None:
    try:
        from accelerate import init_empty_weights
    except ImportError:
        sys.exit("bench/gpu_decode.py builds its models without memory through accelerate: pip install 'kiln[bench]'")
    from transformers import LlamaForCausalLM

    import kiln

    for name in models:
        with init_empty_weights():
            m = LlamaForCausalLM(_config(name)).eval()
        for v in variants:
            path = os.path.join(out, f"{name}-{v}")
            t = time.perf_counter()
            kiln.compile(
                m,
                target="cuda",
                max_context=max_context,
                pack_weights=False,
                target_options=target_options,
                **VARIANTS[v],
            ).save(path)
            print(f"built {path} in {time.perf_counter() - t:.1f} s", flush=True)


# -- on the GPU -------------------------------------------------------------------------------------


def _sync():
    import torch

    torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Device copy bandwidth, bytes read + written per second (the roofline's denominator)."""
    import torch

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    _sync()
    return 2 * n * 20 / (time.perf_counter() - t)


def hf_decode(model, ids, new: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) for greedy generation of `new` tokens."""
    import torch

    def gen(n):
        _sync()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync()
        return time.perf_counter() - t

    gen(2)
    t1, tn = gen(1), gen(new)
    return t1, (new - 1) / (tn - t1)


def compiled_generate(model, ids, new: int) -> tuple[float, float]:
    """transformers' own torch.compile path: generate() with a static cache compiles the decoding
    step (fullgraph, mode="reduce-overhead": CUDA graphs) — the gpt-fast recipe as transformers ships
    it. Returns (seconds of the first, compiling call, decode tokens/s)."""
    model.generation_config.cache_implementation = "static"
    t = time.perf_counter()
    hf_decode(model, ids, 8)
    compile_s = time.perf_counter() - t
    return compile_s, hf_decode(model, ids, new)[1]


def profile_decode(path: str, weights: dict, prompt: list[int], top: int = 40) -> None:
    """Per-kernel GPU time of kiln decode steps (graphs off, so each kernel is seen), via torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    from kiln.runtime.engine import Engine

    eng = Engine(path, kv_cache_tokens=1024, weights=weights, verify=False, cuda_graphs=False)
    pages = eng.pool.alloc(eng.pool.pages_for(len(prompt) + 16))
    eng.prefill(prompt, pages)
    eng.decode([1], [len(prompt)], [pages])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(4):
            eng.decode([1], [len(prompt) + i], [pages])
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70), flush=True)
    eng.close()  # its GPU memory back now, for the next variant


def kiln_bench(path: str, weights: dict, prompt: list[int], new: int, batches: list[int], long_prompt: list[int]):
    from kiln.runtime.engine import Engine
    from kiln.runtime.sampling import SamplingParams

    eng = Engine(
        path,
        kv_cache_tokens=max(batches + [1]) * (len(prompt) + new) + len(long_prompt) + 64,
        weights=weights,
        verify=False,
    )
    sp = SamplingParams(max_tokens=new, ignore_eos=True)
    eng.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    res = {}
    t = time.perf_counter()
    out = eng.generate([prompt], sp)[0]
    total = time.perf_counter() - t
    res["decode_tok_s"] = (new - 1) / (total - out.prefill_seconds)
    for n, ids in (("ttft_128", prompt), ("ttft_2048", long_prompt)):
        pages = eng.pool.alloc(eng.pool.pages_for(len(ids)))
        eng.prefill(ids, pages)  # warm-up at this length
        t = time.perf_counter()
        eng.prefill(ids, pages)
        res[n] = time.perf_counter() - t
        eng.pool.release(pages)
    for b in batches:
        t = time.perf_counter()
        outs = eng.generate([prompt] * b, SamplingParams(max_tokens=64, ignore_eos=True))
        total = time.perf_counter() - t
        res[f"batch{b}_tok_s"] = b * 63 / (total - sum(o.prefill_seconds for o in outs))
    eng.close()  # its GPU memory back now, for the next variant
    return res


def crossover(path: str, weights: dict, prompt: list[int], batches: list[int], new: int = 33) -> dict:
    """Decode tok/s at each batch size through the GEMV entry (`decode`) and the GEMM entry
    (`decode_batched`), the same engine and prompts: where the target's `gemv_max_batch` should sit."""
    from kiln.runtime.engine import Engine
    from kiln.runtime.sampling import SamplingParams

    eng = Engine(path, kv_cache_tokens=max(batches) * (len(prompt) + new + 32), weights=weights, verify=False)
    sp = SamplingParams(max_tokens=new, ignore_eos=True)
    out: dict = {}
    for b in batches:
        for label, limit in (("gemv", 10**6), ("gemm", 0.5)):  # batch > limit takes decode_batched
            eng.gemv_max_batch = limit
            eng.generate([prompt] * b, SamplingParams(max_tokens=3, ignore_eos=True))  # capture this size
            t = time.perf_counter()
            outs = eng.generate([prompt] * b, sp)
            total = time.perf_counter() - t
            out.setdefault(str(b), {})[label] = b * (new - 1) / (total - sum(o.prefill_seconds for o in outs))
        print(
            f"    crossover batch {b}: " + "  ".join(f"{k} {v:.0f} tok/s" for k, v in out[str(b)].items()), flush=True
        )
    eng.close()  # its GPU memory back now, for the next variant
    return out


def seeded_model(cfg, device: str = "cuda", dtype: str = "float16"):
    """The benchmark's random weights: a LlamaForCausalLM of `cfg` initialized from seed 0, made on `device`
    in `dtype`. Every benchmark that runs a random-weight model calls this, so the same shape gets the same
    weights (bench/serving.py's GPU mode too)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def run(
    art: str,
    models: list[str],
    variants: list[str],
    baselines: list[str],
    new: int,
    batches: list[int],
    json_path: str | None = None,
):
    import torch

    from kiln.targets.cuda.weights import WeightMaker, tensors_of

    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FP16.items() if k in gpu), None)
    bw = copy_bandwidth()
    print(
        f"GPU: {gpu}; measured copy bandwidth {bw / 1e12:.2f} TB/s; dense fp16 peak "
        f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s (data sheet)",
        flush=True,
    )
    results = {"gpu": gpu, "copy_bandwidth": bw, "peak_fp16": peak, "models": {}}
    g = torch.Generator().manual_seed(0)
    for name in models:
        cfg = _config(name)
        model = seeded_model(cfg)
        prompt = torch.randint(0, cfg.vocab_size, (128,), generator=g).tolist()
        long_prompt = torch.randint(0, cfg.vocab_size, (2048,), generator=g).tolist()
        ids = torch.tensor([prompt], device="cuda")
        n_embed = cfg.vocab_size * cfg.hidden_size
        params = sum(p.numel() for p in model.parameters())
        body = params - (0 if cfg.tie_word_embeddings else n_embed)  # an untied embedding table is not streamed
        kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
        ctx = len(prompt) + new // 2
        rows: dict = {}
        results["models"][name] = rows
        fp16_bytes = body * 2 + kv_tok * ctx

        def row(label, tok_s, bytes_per_token, extra=None):
            r = {"decode_tok_s": tok_s, "roofline_pct": 100 * tok_s * bytes_per_token / bw, **(extra or {})}
            rows[label] = r
            if json_path:  # after each figure, so a run cut short keeps what it measured
                with open(json_path, "w") as f:
                    json.dump(results, f, indent=1)
            print(
                f"  {name} {label:>16}: {tok_s:8.1f} tok/s  {r['roofline_pct']:5.1f}% of roofline"
                + "".join(f"  {k}={v:.4g}" for k, v in (extra or {}).items() if isinstance(v, (int, float))),
                flush=True,
            )

        if "eager" in baselines:
            t1, tok_s = hf_decode(model, ids, new)
            row("hf-eager-fp16", tok_s, fp16_bytes, {"prefill_128_s": t1})
        for v in variants:
            path = os.path.join(art, f"{name}-{v}")
            man = json.load(open(os.path.join(path, "manifest.json")))
            t = time.perf_counter()
            weights = WeightMaker(tensors_of(model)).all(man)
            _sync()
            made = time.perf_counter() - t
            # bytes streamed per token: every field but an untied embedding table (one row is read)
            streamed = sum(
                _nbytes(weights[s["name"]])
                for s in man["weights"]
                if cfg.tie_word_embeddings or not all(x.startswith("model.embed_tokens") for x in s["sources"])
            )
            if os.environ.get("KILN_PROFILE"):
                profile_decode(path, weights, prompt)
            r = kiln_bench(path, weights, prompt, new, batches, long_prompt)
            if os.environ.get("KILN_CROSSOVER"):  # comma-separated batch sizes
                r["crossover"] = crossover(
                    path, weights, prompt, [int(b) for b in os.environ["KILN_CROSSOVER"].split(",")]
                )
            del weights
            torch.cuda.empty_cache()
            ttft_roof = {n: 2 * body * t / peak for n, t in (("ttft_128", 128), ("ttft_2048", 2048))} if peak else {}
            row(
                f"kiln-{v}",
                r.pop("decode_tok_s"),
                streamed + kv_tok * ctx,
                dict(r, weights_made_s=made, **{f"{k}_x_roofline": r[k] / ttft_roof[k] for k in ttft_roof}),
            )
        if "compile" in baselines:
            try:
                compile_s, tok_s = compiled_generate(model, ids, new)
                row("torch.compile-fp16", tok_s, fp16_bytes, {"compile_s": compile_s})
            except Exception as e:  # a baseline that fails is reported, not fatal
                print(f"  {name} torch.compile baseline failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        results["models"][name] = rows
        if json_path:  # after each model, so a run cut short keeps what it measured
            with open(json_path, "w") as f:
                json.dump(results, f, indent=1)
        del model
        torch.cuda.empty_cache()
    return results


def summarize(run_json: str, machine: str, command: str, save: str = "gpu_decode") -> str:
    """The figures the decode goals are stated in (8B shape), from a run's --json, written to
    bench/results/SAVE.json (gpu_decode.json) with the machine, date and commit of this checkout."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from results_io import write_results

    run = json.load(open(run_json))
    rows = run["models"]["llama-3.1-8b"]

    def tok(label: str, key: str = "decode_tok_s") -> float:
        return rows[label][key]

    figures: dict = {"command": command, "gpu": run["gpu"], "copy_bandwidth": run["copy_bandwidth"]}
    figures.update(
        fp16_tok_s_8b=tok("kiln-fp16"),
        fp16_roofline_share_8b=rows["kiln-fp16"]["roofline_pct"] / 100,
        int8_tok_s_8b=tok("kiln-int8"),
        int4_tok_s_8b=tok("kiln-int4"),
        int8_vs_fp16_8b=tok("kiln-int8") / tok("kiln-fp16"),
        int4_vs_fp16_8b=tok("kiln-int4") / tok("kiln-fp16"),
    )
    if "torch.compile-fp16" in rows:
        figures.update(
            torch_compile_tok_s_8b=tok("torch.compile-fp16"),
            fp16_vs_torch_compile_8b=tok("kiln-fp16") / tok("torch.compile-fp16"),
        )
    if "batch16_tok_s" in rows["kiln-fp16"]:
        figures.update(
            fp16_batch16_tok_s_8b=tok("kiln-fp16", "batch16_tok_s"),
            int4_batch16_tok_s_8b=tok("kiln-int4", "batch16_tok_s"),
            int4_vs_fp16_8b_batch16=tok("kiln-int4", "batch16_tok_s") / tok("kiln-fp16", "batch16_tok_s"),
        )
    for b in (32, 64):
        if f"batch{b}_tok_s" in rows["kiln-fp16"]:
            figures.update({f"{v}_batch{b}_tok_s_8b": tok(f"kiln-{v}", f"batch{b}_tok_s") for v in ("fp16", "int4")})
    small = run["models"].get("llama-3.2-1b", {})
    if "kiln-fp16" in small:
        figures.update(
            fp16_tok_s_1b=small["kiln-fp16"]["decode_tok_s"],
            fp16_roofline_share_1b=small["kiln-fp16"]["roofline_pct"] / 100,
        )
        if "kiln-int4" in small:
            figures["int4_vs_fp16_1b"] = small["kiln-int4"]["decode_tok_s"] / small["kiln-fp16"]["decode_tok_s"]
        if "torch.compile-fp16" in small:
            figures["fp16_vs_torch_compile_1b"] = (
                small["kiln-fp16"]["decode_tok_s"] / small["torch.compile-fp16"]["decode_tok_s"]
            )
    figures["models"] = run["models"]
    return write_results(save, figures, on=machine)  # the GPU host, not this one


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("build", "run", "summarize"))
    ap.add_argument("dir")
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")  # 70B: bench/gpu_tp.py, on 2 GPUs
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--baselines", default="eager,compile")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--json")
    ap.add_argument("--machine", default="", help="summarize: the GPU host, in words")
    ap.add_argument("--command", default="", help="summarize: the command the run was made with")
    ap.add_argument("--save", default="gpu_decode", help="summarize: bench/results/SAVE.json")
    ap.add_argument("--gemv-rows", type=int, default=None, help="build: output rows per warp in the decode GEMV")
    ap.add_argument("--gemv-splits", type=int, default=None, help="build: warps sharing a row in the decode GEMV")
    a = ap.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    if a.mode == "summarize":  # DIR is the run's --json here
        summarize(a.dir, a.machine, a.command, a.save)
        return
    if a.mode == "build":
        opts = {k: v for k, v in (("gemv_rows", a.gemv_rows), ("gemv_splits", a.gemv_splits)) if v}
        build(a.dir, models, [v for v in a.variants.split(",") if v], opts or None)
        return
    run(
        a.dir,
        models,
        [v for v in a.variants.split(",") if v],
        [b for b in a.baselines.split(",") if b],
        a.new_tokens,
        [int(b) for b in a.batches.split(",") if b],
        a.json,
    )


if __name__ == "__main__":
    sys.exit(main())
