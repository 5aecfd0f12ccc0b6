"""Command line: `kiln build`, `kiln run`, `kiln chat`, `kiln serve`, `kiln inspect`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kiln.targets.base import available_targets


def _progress_printer():
    t0 = time.perf_counter()

    def show(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return show


def cmd_build(a: argparse.Namespace) -> int:
    from kiln.api import cached_build

    # refuse a misspelt pass or scheme now, not after loading the model
    from kiln.pipeline import check_pipeline, parse_pipeline

    check_pipeline(parse_pipeline(a.passes))
    if a.quant:
        from kiln.quant import parse_scheme

        q = parse_scheme(a.quant)
        if a.target == "cuda":  # the GPU kernels load a group's codes in 16-byte vectors
            from kiln.targets.cuda.kernels import _vec

            if q.bits not in (4, 8) or (q.group and q.group % _vec(q.bits)):
                raise ValueError(
                    f"--quant {a.quant}: target cuda has int8 and int4 kernels with groups that are multiples "
                    f"of {_vec(q.bits) if q.bits in (4, 8) else '16 (int8) or 32 (int4)'}, e.g. int4_g32, "
                    "int4_g128, int8"
                )
    show = _progress_printer()
    t0 = time.perf_counter()
    quant = dict(
        quant=a.quant, quant_method=a.quant_method, kv_quant=a.kv_quant, w8a8=a.w8a8, calib=a.calib, eval_text=a.eval
    )
    if a.quant_method != "rtn" or a.w8a8:
        quant["calib"] = a.calib or "lee"
    if getattr(a, "attention", None):
        quant["attention"] = a.attention
    for k in ("prune", "sparsify", "distill_steps"):
        if getattr(a, k, None):
            quant[k] = getattr(a, k)
    if a.sparsify:
        quant["sparsify_method"] = a.sparsify_method
    if a.distill_steps:
        quant["calib"] = a.calib or "lee"
    if a.target == "cuda":
        quant["target_options"] = {"arch": a.cuda_arch, "gemm": a.cuda_gemm}
    if a.no_weights:
        quant["pack_weights"] = False
    if a.target == "mlir":
        quant["mlir_forms"] = a.mlir_form or ["linalg-on-tensors"]
        if a.mlir_static:
            quant["mlir_static"] = {k: int(v) for k, v in (kv.split("=") for kv in a.mlir_static.split(","))}
    path, hit = cached_build(
        a.model,
        a.output,
        target=a.target,
        passes=a.passes,
        max_context=a.max_context,
        progress=show,
        use_cache=not a.no_cache,
        dump_ir=a.dump_ir,
        **{k: v for k, v in quant.items() if v or k == "pack_weights"},
    )
    from kiln.runtime.artifact import read_manifest

    m = read_manifest(path)
    if hit:
        show(f"served from the build cache in {time.perf_counter() - t0:.1f}s")
    else:
        show("phase times: " + ", ".join(f"{k} {v:.1f}s" for k, v in m.get("timings", {}).items()))
    print(path)
    return 0


def _params(a: argparse.Namespace):
    from kiln.runtime.sampling import SamplingParams

    p = SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        seed=a.seed,
        stop=tuple(a.stop or ()),
        n=getattr(a, "n", 1),
    )
    p.validate()  # before the artifact loads
    return p


def cmd_run(a: argparse.Namespace) -> int:
    import kiln

    params = _params(a)
    prompts = a.prompt or []
    if not prompts:
        print("kiln run: give at least one --prompt", file=sys.stderr)
        return 2
    eng = kiln.load(a.artifact, kv_cache_tokens=a.kv_cache_tokens, verify=not a.no_verify)
    chat = not a.raw and eng.tokenizer is not None and eng.tokenizer.chat_template is not None
    draft = a.speculate
    if a.json:
        outs = eng.generate(prompts, params, chat=chat, draft=draft)
        rows = [
            {
                "prompt": prompts[i // params.n],
                "index": o.index,
                "text": o.text,
                "token_ids": o.token_ids,
                "finish_reason": o.finish_reason,
                "prompt_tokens": len(o.prompt_ids),
                "completion_tokens": len(o.token_ids),
            }
            for i, o in enumerate(outs)
        ]
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return 0
    if len(prompts) == 1 and params.n == 1 and eng.tokenizer is not None:
        # Stream text deltas: whole characters, and nothing of a stop string
        from kiln.runtime.serving import Server

        t0 = time.perf_counter()
        with Server(eng, max_batch=1, draft=draft) as srv:
            h = srv.submit(prompts[0], params, chat=chat)
            for d in h.deltas():
                sys.stdout.write(d.text)
                sys.stdout.flush()
            out = h.result()
            m = srv.metrics()
        dt = time.perf_counter() - t0
        print()
        spec = ""
        if m.get("acceptance_rate") is not None:
            spec = f", {m['acceptance_rate']:.0%} of drafts accepted, {m['tokens_per_verify']:.2f} tokens per verify"
        print(
            f"[{len(out.token_ids)} tokens in {dt:.2f}s, prefill {out.prefill_seconds * 1000:.0f} ms, "
            f"{len(out.token_ids) / dt:.1f} tok/s{spec}]",
            file=sys.stderr,
        )
        return 0
    outs = eng.generate(prompts, params, chat=chat, draft=draft)
    for i, o in enumerate(outs):
        print(f"### {prompts[i // params.n]}\n{o.text if eng.tokenizer else o.token_ids}\n")
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    import kiln
    from kiln.chat_cli import chat_loop

    params = _params(a)
    eng = kiln.load(a.artifact, kv_cache_tokens=a.kv_cache_tokens, verify=not a.no_verify)
    return chat_loop(eng, params, a.system)


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from kiln.runtime.openai_api import run
    except ImportError as e:
        print(f"kiln serve: {e.name} is missing: pip install 'kiln[serve]'", file=sys.stderr)
        return 1
    run(
        a.artifact,
        host=a.host,
        port=a.port,
        model_name=a.model_name,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        kv_cache_tokens=a.kv_cache_tokens,
        prefill_chunk=a.prefill_chunk,
        verify=not a.no_verify,
        log_level=a.log_level,
    )
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from kiln.report import render_report
    from kiln.runtime.artifact import read_manifest

    m = read_manifest(a.artifact)
    if a.json:
        print(json.dumps(m, indent=1))
        return 0
    print(render_report(m, a.kv_budget))
    if m.get("target", {}).get("name") == "mlir":
        print("## MLIR\n")
        for key, f in m["target"]["mlir_files"].items():
            print(f"- {key}: {f}")
        for e, sig in m["entry_points"].items():
            args = ", ".join(
                f"{x['name']}:{x['dtype']}[{','.join(map(str, x['shape']))}]"
                for x in sig["args"]
                if x["kind"] != "weight"
            )
            nw = sum(x["kind"] == "weight" for x in sig["args"])
            print(f"- {e}({args}, +{nw} weights) -> logits, new kv caches")
        print()
    print("## Files\n")
    for rel, meta in sorted(m.get("files", {}).items()):
        print(f"- {rel}: {meta['bytes'] / 1e6:.2f} MB, sha256 {meta['sha256'][:16]}...")
    if a.verify:
        from kiln.runtime.integrity import audit

        print("\n## Integrity\n")
        results = audit(a.artifact, m, full=True)
        for what, problem in results:
            print(f"- {what}: {'ok' if problem is None else 'FAILED: ' + problem}")
        bad = sum(problem is not None for _, problem in results)
        if bad:
            print(f"\n{bad} check(s) failed: do not load this artifact; rebuild it")
            return 1
        print(
            "\nintegrity: the manifest, its checksum and every file match (the library is native code: "
            "load artifacts only from builds you trust)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    import kiln

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="kiln", description="Ahead-of-time compiler for LLM inference", formatter_class=fmt
    )
    p.add_argument("--version", action="version", version=f"kiln {kiln.__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile a model into an artifact directory", formatter_class=fmt)
    b.add_argument("model", help="built-in name (smollm2-135m), a .gguf file, or a transformers folder")
    b.add_argument("-o", "--output", required=True, help="artifact directory to write")
    b.add_argument(
        "--target",
        default="cpu",
        choices=available_targets(),
        help="cpu (TVM LLVM), cuda (NVIDIA GPU; built here, run with TVM's runtime), pim (simulated "
        "HBM-PIM; runs functionally on the CPU), mlir (torch-mlir)",
    )
    b.add_argument("--cuda-arch", default="sm_90a", help="GPU architecture for --target cuda (sm_80, sm_90a, ...)")
    b.add_argument(
        "--cuda-gemm",
        default="cublas",
        choices=["cublas", "tvm"],
        help="prefill GEMMs: cuBLAS tensor cores at run time, or TVM's own CUDA-core schedules",
    )
    b.add_argument(
        "--no-weights",
        action="store_true",
        help="build from shapes alone; weights are supplied at load time (Engine(path, weights=...))",
    )
    b.add_argument("--prune", default=None, help="structured pruning, e.g. heads=0.2,ffn=0.2,layers=2")
    b.add_argument("--sparsify", default=None, help="unstructured ratio (0.5) or pattern (2:4)")
    b.add_argument(
        "--sparsify-method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"], help="how to pick weights"
    )
    b.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="distillation recovery steps after pruning (on the calibration text)",
    )
    b.add_argument(
        "--mlir-form",
        action="append",
        default=None,
        choices=["torch", "linalg-on-tensors", "tosa", "stablehlo"],
        help="MLIR output form (repeatable)",
    )
    b.add_argument(
        "--mlir-static",
        default=None,
        help="fixed sizes, e.g. batch=1,tokens=128,max_pages=8,pages=64 (tosa needs them)",
    )
    b.add_argument("--passes", default="O1", help="pipeline, e.g. O1 or 'canonicalize,fuse-norms,...'")
    b.add_argument("--max-context", type=int, default=None, help="longest sequence the artifact serves")
    b.add_argument("--dump-ir", default=None, help="write the IR after every pass into this folder")
    b.add_argument("--no-cache", action="store_true", help="do not use or fill the build cache")
    b.add_argument("--quant", default=None, help="weight scheme: int8, int4_g128, int4_g32_sym, int4_sym, ...")
    b.add_argument("--quant-method", default="rtn", choices=["rtn", "awq", "gptq"], help="how codes are chosen")
    b.add_argument("--kv-quant", default=None, choices=["int8", "fp8_e4m3"], help="store the KV cache in 8 bits")
    b.add_argument("--w8a8", action="store_true", help="int8 weights and dynamic int8 activations (SmoothQuant)")
    b.add_argument(
        "--attention",
        default=None,
        help="convert attention: gqa:N, mqa, mla:RANK[:ROPE_DIMS] (MLA is activation-aware with --calib)",
    )
    b.add_argument(
        "--calib", default=None, help="calibration text file (default for awq/gptq/w8a8: the Lee corpus lee.cor)"
    )
    b.add_argument(
        "--eval",
        default=None,
        help="evaluation text file ('lee_background' for the built-in one): "
        "lossy passes record perplexity and KL on it",
    )
    b.set_defaults(fn=cmd_build)
    r = sub.add_parser("run", help="generate text with an artifact", formatter_class=fmt)
    r.add_argument("artifact", help="an artifact directory (kiln build -o)")
    r.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    _sampling_args(r, max_tokens=64)
    r.add_argument("--n", type=int, default=1, help="completions per prompt")
    r.add_argument("--raw", action="store_true", help="do not apply the chat template")
    r.add_argument("--json", action="store_true", help="print the completions as JSON")
    r.add_argument(
        "--speculate",
        default=None,
        choices=["ngram"],
        help="speculative decoding: ngram drafts from earlier text (prompt lookup), checked by the model; "
        "same output, faster when the output repeats the prompt (summaries, code edits)",
    )
    _load_args(r)
    r.set_defaults(fn=cmd_run)
    c = sub.add_parser("chat", help="talk to an artifact in the terminal (multi-turn, streamed)", formatter_class=fmt)
    c.add_argument("artifact", help="an artifact directory (kiln build -o)")
    c.add_argument("--system", default=None, help="system prompt")
    _sampling_args(c, max_tokens=256)
    _load_args(c)
    c.set_defaults(fn=cmd_chat)
    s = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API", formatter_class=fmt)
    s.add_argument("artifact", help="an artifact directory (kiln build -o)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--model-name", default=None, help="the model name clients use (default: the artifact's folder)")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="sequences waiting beyond the batch; more get 429")
    s.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per scheduler step")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _load_args(s)
    s.set_defaults(fn=cmd_serve)
    i = sub.add_parser("inspect", help="show an artifact's manifest and report", formatter_class=fmt)
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.add_argument(
        "--verify",
        action="store_true",
        help="check integrity and print every check: the manifest against manifest.sha256, each file's size "
        "and SHA-256, names inside the artifact, nothing loadable unlisted (exit 1 if any fails)",
    )
    i.add_argument(
        "--kv-budget",
        type=float,
        default=1.0,
        help="KV-cache memory budget in GiB for the plan (max batch x context per attention variant and KV dtype)",
    )
    i.set_defaults(fn=cmd_inspect)
    a = p.parse_args(argv)
    from kiln.errors import KilnError
    from kiln.runtime.artifact import ArtifactError

    try:
        return a.fn(a)
    except (KilnError, ArtifactError, ValueError) as e:
        print(f"kiln {a.cmd}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nkiln {a.cmd}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`kiln run ... | head`): stop quietly; point stdout at devnull so that
        # Python's own flush at exit does not raise again
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 or -1 disables it")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the likeliest tokens up to this mass")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the likeliest's probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens seen already")
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible samples)")


def _load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-tokens", type=int, default=8192, help="KV-cache size in tokens over all sequences")
    p.add_argument("--no-verify", action="store_true", help="skip the artifact's checksums at load (faster)")


if __name__ == "__main__":
    sys.exit(main())
