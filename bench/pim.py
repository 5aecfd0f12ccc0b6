"""Simulated decode on the `pim` target: GPU-only vs GPU+PIM for SmolLM2-135M and Llama-3.1-8B shapes.

    .venv/bin/python bench/pim.py [--out out/pim] [--shape-only]

SmolLM2-135M comes from a kiln IR graph (a transformers Llama built from its config with random weights,
traced and run through O1 + place-pim); `--shape-only` uses its shape spec instead. Llama-3.1-8B is a shape
spec (no 8B parameters are allocated). Also prints the AttAcc validation table (GPT-3 175B, 8 GPUs).
Prints markdown tables; writes PNG plots to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from kiln.targets.pim.cost import (
    GPT3_175B,
    LLAMA31_8B,
    SMOLLM2_135M,
    decode_works,
    generation,
    simulate_graph,
    simulate_step,
)
from kiln.targets.pim.hw import DEFAULT
from kiln.targets.pim.target import plot_breakdown, plot_placement, plot_speedup

BATCHES = (1, 4, 16, 64)
CONTEXTS = (1024, 2048, 4096, 8192)
ATTACC = {21: (506, 868), 48: (727, 1679), 78: (881, 2527)}


def smollm2_graph():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import kiln
    import kiln.targets.pim.place_pim

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    g = kiln.trace(LlamaForCausalLM(cfg).eval(), max_tokens=8192)
    return kiln.run_pipeline(g, "O1")[0]


def step_fn(model):
    """(batch, context, policy) -> StepResult, from a graph or a shape spec."""
    if hasattr(model, "nodes"):
        from kiln.targets.pim.place_pim import place_pim

        def f(b, c, policy):
            g = place_pim(model, batch=b, context=c, policy=policy) if policy == "auto" else model
            return simulate_graph(g, b, c, 0, DEFAULT, policy)

        return f
    return lambda b, c, policy: simulate_step(decode_works(model, b, c, 0, DEFAULT), DEFAULT, policy, tokens=b)


def sweep(name, model, out):
    f = step_fn(model)
    print(f"\n### {name}: simulated decode, one H100-class GPU + 5 HBM3-PIM stacks (bank PIM, power limit)\n")
    print(
        "| batch | context | GPU tok/s | GPU+PIM tok/s | speedup | GPU J/tok | GPU+PIM J/tok | energy saving | "
        "ops on PIM |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    speed = {}
    for b in BATCHES:
        for c in CONTEXTS:
            g, p = f(b, c, "gpu"), f(b, c, "auto")
            kinds = sorted({o.op for o in p.ops if o.placement == "pim"})
            speed[(b, c)] = p.tokens_per_s / g.tokens_per_s
            print(
                f"| {b} | {c} | {g.tokens_per_s:,.0f} | {p.tokens_per_s:,.0f} | {speed[(b, c)]:.2f}x | "
                f"{g.j_per_token:.4f} | {p.j_per_token:.4f} | {g.j_per_token / p.j_per_token:.2f}x | "
                f"{', '.join(kinds) or '-'} |"
            )
    tag = name.split()[0].lower().replace(".", "")
    tl = {"GPU-only": f(16, 4096, "gpu"), "GPU+PIM": f(16, 4096, "auto")}
    files = [
        plot_breakdown(tl, os.path.join(out, f"{tag}_breakdown_b16_c4k.png"), f"{name}, batch 16, context 4k"),
        plot_placement(
            tl["GPU+PIM"],
            os.path.join(out, f"{tag}_placement_b16_c4k.png"),
            f"{name}: placement per op, batch 16, context 4k (orange = PIM)",
        ),
        plot_speedup(
            {f"context {c}": (list(BATCHES), [speed[(b, c)] for b in BATCHES]) for c in CONTEXTS},
            "batch",
            os.path.join(out, f"{tag}_speedup_vs_batch.png"),
            f"{name}: speedup vs batch",
        ),
        plot_speedup(
            {f"batch {b}": (list(CONTEXTS), [speed[(b, c)] for c in CONTEXTS]) for b in BATCHES},
            "context (tokens)",
            os.path.join(out, f"{tag}_speedup_vs_context.png"),
            f"{name}: speedup vs context",
        ),
    ]
    return files


def validation(out):
    print(
        "\n### Validation: GPT-3 175B, 8 GPUs tensor-parallel, lin 2048, lout 2048 (AttAcc metric: batch / mean "
        "generation-step latency)\n"
    )
    print(
        "| batch | AttAcc GPU | AttAcc GPU+PIM | AttAcc speedup | kiln GPU | kiln GPU+PIM | kiln speedup | "
        "error | kiln J/step GPU -> PIM | kiln e2e speedup incl. prefill |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    xs, ours, theirs = [], [], []
    for b, (g0, p0) in ATTACC.items():
        g = generation(GPT3_175B, b, 2048, 2048, DEFAULT, "gpu")
        p = generation(GPT3_175B, b, 2048, 2048, DEFAULT, "auto")
        s, s0 = p.tokens_per_s / g.tokens_per_s, p0 / g0
        xs.append(b), ours.append(s), theirs.append(s0)
        print(
            f"| {b} | {g0} | {p0} | {s0:.2f}x | {g.tokens_per_s:.0f} | {p.tokens_per_s:.0f} | {s:.2f}x | "
            f"{100 * (s / s0 - 1):+.1f}% | {g.mean_step_j:.1f} -> {p.mean_step_j:.1f} J | "
            f"{p.e2e_tokens_per_s / g.e2e_tokens_per_s:.2f}x |"
        )
    print("\nAttAcc energy per decode step at batch 48: 42.5 J -> 22.7 J.")
    return [
        plot_speedup(
            {"AttAcc simulator": (xs, theirs), "kiln pim": (xs, ours)},
            "batch",
            os.path.join(out, "gpt3_validation.png"),
            "GPT-3 175B, 8 GPUs: speedup vs batch",
            logx=False,
        )
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/pim")
    ap.add_argument("--shape-only", action="store_true", help="use SmolLM2's shape spec instead of tracing it")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    print(
        f"hardware config {DEFAULT.version}: break-even reuse {DEFAULT.break_even_reuse:.2f}, PIM stream "
        f"{DEFAULT.pim_stream_bw / 1e12:.1f} TB/s vs GPU {DEFAULT.gpu_eff_bw / 1e12:.2f} TB/s effective"
    )
    files = validation(a.out)
    smol = SMOLLM2_135M if a.shape_only else smollm2_graph()
    files += sweep("SmolLM2-135M" + (" (shape spec)" if a.shape_only else " (kiln IR graph)"), smol, a.out)
    files += sweep("Llama-3.1-8B (shape spec)", LLAMA31_8B, a.out)
    print(f"\nplots: {', '.join(files)}  ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
