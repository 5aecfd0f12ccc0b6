"""Command line: `kiln build`, `kiln tune`, `kiln run`, `kiln chat`, `kiln serve`, `kiln inspect`, `kiln bundle`.

`run` and `serve` live in kiln.runtime.cli, which a deployment bundle runs without this module."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kiln.log import get
from kiln.runtime.cli import (
    add_kernels_parser,
    add_load_args,
    add_run_parser,
    add_sampling_args,
    add_serve_parser,
    sampling_params,
)
from kiln.targets.base import available_targets

log = get("cli")


def cmd_build(a: argparse.Namespace) -> int:
    from kiln.api import cached_build

    # refuse a misspelt pass or scheme now, not after loading the model
    from kiln.pipeline import check_pipeline, parse_pipeline

    check_pipeline(parse_pipeline(a.passes))
    if a.quant:
        from kiln.quant import parse_scheme

        q = parse_scheme(a.quant)
        if a.target == "cuda":  # what the GPU kernels take, refused before the model loads
            from kiln.targets.cuda.layouts import quant_refusal

            why = quant_refusal(q.bits, q.group)
            if why:
                raise ValueError(f"--quant {a.quant}: {why}")
    t0 = time.perf_counter()
    quant = dict(
        quant=a.quant, quant_method=a.quant_method, kv_quant=a.kv_quant, w8a8=a.w8a8, calib=a.calib, eval_text=a.eval
    )
    if a.quant_method != "rtn" or a.w8a8:
        quant["calib"] = a.calib or "lee"
    if getattr(a, "attention", None):
        quant["attention"] = a.attention
    if a.quant_plan:
        quant["quant_plan"] = a.quant_plan
    for k in ("prune", "sparsify", "distill_steps"):
        if getattr(a, k, None):
            quant[k] = getattr(a, k)
    if a.draft:
        from kiln.draft import parse_drafts

        parse_drafts(a.draft)  # a misspelt draft is refused before loading the model
        quant["draft"] = a.draft
    if a.sparsify:
        quant["sparsify_method"] = a.sparsify_method
    if a.distill_steps:
        quant["calib"] = a.calib or "lee"
    if a.target == "cuda":
        quant["target_options"] = {"arch": a.cuda_arch, "gemm": a.cuda_gemm}
    if a.no_weights:
        quant["pack_weights"] = False
    if a.tensor_parallel != 1:
        quant["tensor_parallel"] = a.tensor_parallel
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
        use_cache=not a.no_cache,
        dump_ir=a.dump_ir,
        **{k: v for k, v in quant.items() if v or k == "pack_weights"},
    )
    from kiln.runtime.artifact import read_manifest

    m = read_manifest(path)
    if hit:
        log.info(f"served from the build cache in {time.perf_counter() - t0:.1f}s")
    else:
        log.info("phase times: " + ", ".join(f"{k} {v:.1f}s" for k, v in m.get("timings", {}).items()))
    print(path)
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from kiln.tuning import parse_budget, tune

    parse_budget(a.budget)  # a bad budget is refused before the model loads
    res = tune(
        a.model,
        target=a.target,
        budget=a.budget,
        objective=a.objective,
        max_trials=a.max_trials,
        out=a.output,
        schemes=[s.strip() for s in a.schemes.split(",") if s.strip()],
        calib=a.calib,
        eval_text=a.eval,
        eval_tokens=a.eval_tokens,
        build=not a.no_build,
    )
    c = res.chosen
    speed = f", decode {c.decode_tok_s:.1f} tok/s" if c.decode_tok_s else ""
    log.info(
        f"chosen: {c.weight_bytes / 1e6:.1f} MB, perplexity {c.ppl:.3f} (fp32 {res.ppl_fp32:.3f}){speed}; "
        f"{len(res.candidates)} plans evaluated in {res.seconds.get('total', 0) / 60:.1f} min; "
        f"report in {res.report.get('tune')}"
    )
    print(res.artifact or res.report.get("tune"))
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    import kiln
    from kiln.chat_cli import chat_loop

    params = sampling_params(a)
    eng = kiln.load(a.artifact, kv_cache_tokens=a.kv_cache_tokens, verify=not a.no_verify)
    return chat_loop(eng, params, a.system)


def cmd_inspect(a: argparse.Namespace) -> int:
    from kiln.report import render_report
    from kiln.runtime.artifact import read_manifest

    m = read_manifest(a.artifact)
    if a.plot:
        from kiln.plots import plot_artifact

        log.info(f"plot written to {plot_artifact(m, a.plot)}")
    if a.json:
        print(json.dumps(m, indent=1))
        return 0
    print(render_report(m, a.kv_budget, a.batch, a.context, a.prefill_chunk))
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


def cmd_bundle(a: argparse.Namespace) -> int:
    from kiln.bundle import make_bundle

    info = make_bundle(a.artifact, a.output, serve=a.serve, tar=not a.no_tar)
    print(info.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    import kiln

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="kiln", description="Ahead-of-time compiler for LLM inference", formatter_class=fmt
    )
    p.add_argument("--version", action="version", version=f"kiln {kiln.__version__}")
    _verbosity_args(p)
    p.set_defaults(verbose=0, quiet=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile a model into an artifact directory", formatter_class=fmt)
    _verbosity_args(b)
    b.add_argument("model", help="built-in name (smollm2-135m, gemma3-270m), a .gguf file, or a transformers folder")
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
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N ranks (GPUs of one host, or CPU processes): rank R's program and weights under "
        "ranks/R; serving it starts one process per rank",
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
        "--draft",
        action="append",
        default=None,
        help="also build a draft model for speculative decoding, shipped in the artifact (repeatable): "
        "self:LAYERS[:STEPS] keeps LAYERS of the model's layers (weights shared; STEPS of distillation), "
        "distill:LAYERS[:STEPS] trains a small model of the same width; e.g. self:8, distill:4:100",
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
    b.add_argument(
        "--quant",
        default=None,
        help="weight scheme: int8, int4_g128, int4_g32_sym, int4_sym, int4_g32_floatzero (float zero points), ...",
    )
    b.add_argument(
        "--quant-plan",
        default=None,
        metavar="PLAN.json",
        help="scheme per weight (JSON: weight name -> scheme or none), e.g. the plan.json kiln tune writes",
    )
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
    t = sub.add_parser(
        "tune",
        help="search a per-projection quantization plan: the smallest or fastest build within an accuracy budget",
        formatter_class=fmt,
    )
    _verbosity_args(t)
    t.add_argument("model", help="built-in name (smollm2-135m, gemma3-270m), a .gguf file, or a transformers folder")
    t.add_argument("-o", "--output", required=True, help="folder to write: OUTPUT/artifact and OUTPUT/report/")
    t.add_argument("--target", default="cpu", choices=available_targets(), help="target the artifact is built for")
    t.add_argument(
        "--budget",
        default="ppl+1%",
        help="accuracy budget on the held-out text: ppl+1%% (relative), ppl+0.5 (absolute) or kl:0.01 (nats/token)",
    )
    t.add_argument(
        "--objective",
        default="size",
        choices=["size", "speed"],
        help="smallest weights, or fastest measured decode (builds a few candidates)",
    )
    t.add_argument("--max-trials", type=int, default=12, help="plans evaluated on the held-out text at most")
    t.add_argument("--schemes", default="int8,int4_g32,int4_g64,int4_g128", help="schemes a projection may take")
    t.add_argument("--calib", default="lee", help="calibration text for the sensitivity analysis")
    t.add_argument("--eval", default="lee_background", help="held-out text every candidate is evaluated on")
    t.add_argument("--eval-tokens", type=int, default=1024, help="tokens of held-out text per evaluation")
    t.add_argument("--no-build", action="store_true", help="search and report only; build nothing")
    t.set_defaults(fn=cmd_tune)
    _verbosity_args(add_run_parser(sub, fmt))
    c = sub.add_parser("chat", help="talk to an artifact in the terminal (multi-turn, streamed)", formatter_class=fmt)
    _verbosity_args(c)
    c.add_argument("artifact", help="an artifact directory (kiln build -o)")
    c.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(c, max_tokens=256)
    add_load_args(c)
    c.set_defaults(fn=cmd_chat)
    add_serve_parser(sub, fmt)
    add_kernels_parser(sub, fmt)
    i = sub.add_parser("inspect", help="show an artifact's manifest and report", formatter_class=fmt)
    _verbosity_args(i)
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.add_argument(
        "--plot",
        default=None,
        metavar="OUT.png",
        help="also draw bytes and FLOPs per pass and the KV budget (batch x context) to a PNG (kiln[plots])",
    )
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
    i.add_argument("--batch", type=int, default=1, help="sequences for the memory estimate (default 1)")
    i.add_argument(
        "--context", type=int, default=None, help="tokens per sequence for the memory estimate (default: max context)"
    )
    i.add_argument(
        "--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill step for the memory estimate"
    )
    i.set_defaults(fn=cmd_inspect)
    u = sub.add_parser(
        "bundle",
        help="package an artifact with the runtime alone (no torch, no compiler) for this Python and platform",
        formatter_class=fmt,
    )
    u.add_argument("artifact", help="an artifact directory (kiln build -o)")
    u.add_argument("-o", "--output", required=True, help="bundle directory to write; OUTPUT.tar.gz beside it")
    u.add_argument("--serve", action="store_true", help="add the HTTP server's packages (fastapi, uvicorn, ...)")
    u.add_argument("--no-tar", action="store_true", help="write the directory only")
    u.set_defaults(fn=cmd_bundle)
    a = p.parse_args(argv)
    from kiln.cli_log import setup

    shown = setup(a.verbose, a.quiet)
    from kiln.errors import KilnError
    from kiln.runtime.artifact import ArtifactError

    try:
        return a.fn(a)
    except (KilnError, ArtifactError, ValueError) as e:
        shown.end_line()  # a step line left open on the terminal keeps its own line
        print(f"kiln {a.cmd}: error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        if (e.name or "kiln").partition(".")[0] == "kiln":
            raise
        # `pip install kiln` is the runtime alone: building, inspecting and bundling need the compile side
        shown.end_line()
        print(f"kiln {a.cmd}: error: {e.name} is not installed: pip install 'kiln[compiler]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        shown.end_line()
        print(f"\nkiln {a.cmd}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`kiln run ... | head`): stop quietly; point stdout at devnull so that
        # Python's own flush at exit does not raise again
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _verbosity_args(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's parser leaves the flags alone unless given, so `kiln -v build` and
    # `kiln build -v` both work
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more detail (debug messages)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="print errors only")


if __name__ == "__main__":
    sys.exit(main())
