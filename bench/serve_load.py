"""Load test of `kiln serve` on loopback: N concurrent streaming clients, a fixed number of requests each.

    .venv/bin/python bench/serve_load.py [--clients 8] [--requests 4] [--max-tokens 32] [--artifact DIR]

Starts `kiln serve` as a subprocess on 127.0.0.1 (a free port) with the real model (SmolLM2-135M, built
with kiln.cached_build unless --artifact is given), then runs --clients asyncio clients of the official
openai AsyncOpenAI client, each sending --requests streaming chat requests one after another (greedy,
ignore_eos, so every request generates --max-tokens tokens). The whole run is bounded by --time-limit
seconds; requests still out then count as errors. Reports throughput, TTFT and TPOT p50/p90/p99 (seen by
the client: first content chunk, then (last - first) / (tokens - 1)) and errors, and writes
bench/results/serve_load.json. The server is stopped with SIGTERM and must drain and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_results

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about compilers.",
    "List three uses of a paperclip.",
    "Explain what a KV cache is in one sentence.",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue?",
    "Name five animals that live in the ocean.",
    "Summarize the plot of Hamlet in two sentences.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(client, model: str, question: str, a) -> dict:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=a.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for c in stream:
        now = time.perf_counter()
        if c.choices and c.choices[0].delta.content:
            first = first or now
            last = now
        if c.usage is not None:
            tokens = c.usage.completion_tokens
    if first is None or tokens < 1:
        raise RuntimeError("the stream ended without text")
    return {
        "ttft_s": first - t0,
        "tpot_s": (last - first) / (tokens - 1) if tokens > 1 and last is not None else None,
        "latency_s": time.perf_counter() - t0,
        "tokens": tokens,
    }


async def _client(i: int, client, model: str, a, out: list, errors: list) -> None:
    for j in range(a.requests):
        try:
            out.append(await _one(client, model, QUESTIONS[(i + j) % len(QUESTIONS)], a))
        except Exception as e:  # counted and reported, the run goes on
            errors.append(f"client {i} request {j}: {e!r}"[:300])


async def _load(base: str, model: str, a) -> tuple[list, list, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=a.time_limit)
    out: list[dict] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(_client(i, client, model, a, out, errors)) for i in range(a.clients)]
    done, pending = await asyncio.wait(tasks, timeout=a.time_limit)
    for t in pending:
        t.cancel()
    wall = time.perf_counter() - t0
    missing = a.clients * a.requests - len(out) - len(errors)
    errors += [f"not finished within --time-limit {a.time_limit}s"] * missing
    await client.close()
    return out, errors, wall


def _pct(xs: list, q: float) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, q)) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds for the whole run")
    ap.add_argument("--artifact", default=None, help="a built artifact (default: kiln.cached_build of --model)")
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    art = a.artifact
    if art is None:
        import kiln

        art, _ = kiln.cached_build(a.model, os.path.join(tempfile.mkdtemp(), "art"))
    port, model = _free_port(), "kiln-load"
    cmd = [sys.executable, "-m", "kiln.cli", "serve", art, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(a.max_batch), "--model-name", model, "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx2 as httpx

        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"kiln serve did not come up (exit code {proc.poll()})")
            time.sleep(0.2)
        out, errors, wall = asyncio.run(_load(base, model, a))
        metrics = httpx.get(base + "/metrics", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    tokens = sum(r["tokens"] for r in out)
    ttft, tpot = [r["ttft_s"] for r in out], [r["tpot_s"] for r in out]
    fig = {
        "model": a.model if a.artifact is None else art,
        "clients": a.clients,
        "requests_per_client": a.requests,
        "max_tokens": a.max_tokens,
        "max_batch": a.max_batch,
        "requests_ok": len(out),
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_s": wall,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(out) / wall if wall > 0 else None,
        **{f"ttft_p{q}_s": _pct(ttft, q) for q in (50, 90, 99)},
        **{f"tpot_p{q}_s": _pct(tpot, q) for q in (50, 90, 99)},
        "server_exit_code": rc,
        "server_preemptions": next(
            (float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("kiln_preemptions_total")),
            None,
        ),
    }
    print(f"{len(out)} ok, {len(errors)} errors in {wall:.1f}s: {fig['tokens_per_s']:.1f} tok/s")
    for k in ("ttft", "tpot"):
        print(f"  {k} p50/p90/p99: " + " / ".join(f"{(fig[f'{k}_p{q}_s'] or 0) * 1000:.0f} ms" for q in (50, 90, 99)))
    write_results("serve_load", fig)
    if errors or rc != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
