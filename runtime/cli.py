"""The runtime's own command line: `run` and `serve` an artifact with nothing from the compile side, and
store a cuda artifact's compiled `kernels` in it.

`kiln run` and `kiln serve` are these commands; a deployment bundle (`kiln bundle`) calls them through
its `./run` and `./serve` launchers, where neither torch nor TVM's compiler is installed. Only the
standard library is imported before the artifact loads, so a bad flag is refused at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .errors import KilnError


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """The sampling flags shared by run and chat."""
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 or -1 disables it")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the likeliest tokens up to this mass")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the likeliest's probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens seen already")
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible samples)")


def add_load_args(p: argparse.ArgumentParser) -> None:
    """The engine flags shared by every command that loads an artifact."""
    p.add_argument("--kv-cache-tokens", type=int, default=8192, help="KV-cache size in tokens over all sequences")
    p.add_argument("--no-verify", action="store_true", help="skip the artifact's checksums at load (faster)")


def sampling_params(a: argparse.Namespace) -> Any:
    """SamplingParams from the flags, validated before the artifact loads."""
    from .sampling import SamplingParams

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
    p.validate()
    return p


def cmd_run(a: argparse.Namespace) -> int:
    """Generate from each --prompt; one prompt streams its text as it comes."""
    params = sampling_params(a)
    prompts = a.prompt or []
    if not prompts:
        print("kiln run: give at least one --prompt", file=sys.stderr)
        return 2
    from .artifact import hand_verified_weights_to_loader
    from .engine import Engine

    hand_verified_weights_to_loader()  # the checksum pass reads the weights once, for the engine too
    eng = Engine(a.artifact, kv_cache_tokens=a.kv_cache_tokens, verify=not a.no_verify)
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
        from .serving import Server

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


def cmd_serve(a: argparse.Namespace) -> int:
    """Serve over the OpenAI-compatible HTTP API until SIGINT/SIGTERM."""
    try:
        from .artifact import hand_verified_weights_to_loader
        from .openai_api import run

        hand_verified_weights_to_loader()  # the checksum pass reads the weights once, for the engine too
    except ImportError as e:
        print(f"kiln serve: {e.name} is missing: pip install 'kiln[serve]' (or kiln bundle --serve)", file=sys.stderr)
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


def add_run_parser(sub: Any, fmt: type) -> Any:
    r = sub.add_parser("run", help="generate text with an artifact", formatter_class=fmt)
    r.add_argument("artifact", help="an artifact directory (kiln build -o)")
    r.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    add_sampling_args(r, max_tokens=64)
    r.add_argument("--n", type=int, default=1, help="completions per prompt")
    r.add_argument("--raw", action="store_true", help="do not apply the chat template")
    r.add_argument("--json", action="store_true", help="print the completions as JSON")
    r.add_argument(
        "--speculate",
        default=None,
        choices=["ngram", "self", "distill", "auto"],
        help="speculative decoding, same output: ngram drafts from earlier text (prompt lookup; pays when the "
        "output repeats the prompt), self/distill the draft model built into the artifact (kiln build --draft), "
        "auto either one or neither per step, by measured acceptance and cost",
    )
    add_load_args(r)
    r.set_defaults(fn=cmd_run)
    return r


def add_serve_parser(sub: Any, fmt: type) -> None:
    s = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API", formatter_class=fmt)
    s.add_argument("artifact", help="an artifact directory (kiln build -o)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--model-name", default=None, help="the model name clients use (default: the artifact's folder)")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="sequences waiting beyond the batch; more get 429")
    s.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per scheduler step")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_load_args(s)
    s.set_defaults(fn=cmd_serve)


def cmd_kernels(a: argparse.Namespace) -> int:
    """Compile a cuda artifact's kernels with nvcc and store them in it (runtime/cuda_kernels.py)."""
    from .cuda_kernels import store_kernels

    for e in store_kernels(a.artifact):
        print(f"{a.artifact}/{e['file']}: {e['arch']}, {e['bytes'] / 1e6:.1f} MB (nvcc {e['nvcc']})")
    return 0


def add_kernels_parser(sub: Any, fmt: type) -> None:
    k = sub.add_parser(
        "kernels",
        help="compile a cuda artifact's kernels (nvcc, no GPU needed) and store them in it, so that loading "
        "needs no nvcc and no kernel cache",
        formatter_class=fmt,
    )
    k.add_argument("artifact", help="a cuda artifact directory (kiln build --target cuda -o)")
    k.set_defaults(fn=cmd_kernels)


def dispatch(a: argparse.Namespace) -> int:
    """Run the chosen command; errors a user can fix become one line on stderr and exit status 1."""
    try:
        return int(a.fn(a))
    except (KilnError, ValueError) as e:  # ArtifactError is a KilnError
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


def main(argv: list[str] | None = None, prog: str = "kiln") -> int:
    """`run`, `serve` and `kernels` alone: the command line of a deployment bundle."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog=prog, description="Run or serve a kiln artifact", formatter_class=fmt)
    sub = p.add_subparsers(dest="cmd", required=True)
    add_run_parser(sub, fmt)
    add_serve_parser(sub, fmt)
    add_kernels_parser(sub, fmt)
    return dispatch(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
