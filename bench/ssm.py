"""A state-space model against an attention model of the same size: decode speed and memory per sequence
as the context grows, kiln on the CPU (and transformers eager at the shortest context), one process.

The models are random-weight: a Mamba-2 shape (hidden 256, 4 layers, 8 heads x 64, state 64, conv 4) and a
Llama of the same hidden size, layers and heads with an MLP narrowed so both hold about 2.3M parameters.
kiln's decode step at context L is timed at position L
of a sequence whose cache holds L positions: attention reads all L cached keys and values (their values
do not change the cost, so no L-token prefill is run), the state-space layers read and write their
fixed-size state. transformers runs its own cache after a real prefill of the prompt.

    .venv/bin/python bench/ssm.py [--contexts 4096,32768] [--steps 16] [--hf-context 4096]

Writes bench/results/ssm.json. Absolute times on a shared CPU vary run to run; quote the ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import write_results

HIDDEN, LAYERS, HEADS, VOCAB = 256, 4, 8, 1024
ROUNDS = 3  # rounds of `steps` decode steps; the best is reported


def models() -> dict[str, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    mamba = Mamba2ForCausalLM(
        Mamba2Config(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_heads=HEADS,
            head_dim=2 * HIDDEN // HEADS,
            expand=2,
            state_size=64,
            n_groups=1,
            conv_kernel=4,
            chunk_size=256,
            tie_word_embeddings=False,
        )
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=216,  # parameters within 3% of the Mamba-2 shape's (no MLP there: in/out projections)
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=65536,
            tie_word_embeddings=False,
        )
    )
    return {"mamba2": mamba.eval(), "llama": llama.eval()}


def kiln_decode(eng, context: int, steps: int) -> float:
    """Seconds per decode step of one sequence at positions just past `context` (the best of ROUNDS rounds)."""
    pages = eng.pool.alloc(eng.pool.pages_for(context + ROUNDS * steps + 1))
    try:
        if eng.state_slots is not None:
            eng.state_slots.assign(pages[0])
        eng.decode([1], [context], [pages])  # warm
        best = float("inf")
        for _ in range(ROUNDS):  # the best round: the host is shared, other work only slows a round down
            t0 = time.perf_counter()
            for i in range(steps):
                eng.decode([1 + i % 7], [context + 1 + i], [pages])
            best = min(best, (time.perf_counter() - t0) / steps)
        return best
    finally:
        eng.pool.release(pages)


def hf_decode(model, context: int, steps: int) -> float:
    ids = torch.randint(0, VOCAB, (1, context))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        key = "cache" if "cache" in out else "past_key_values"
        nxt = out.logits[:, -1:].argmax(-1)
        best, pos = float("inf"), context
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=nxt, use_cache=True, position_ids=torch.tensor([[pos]]), **{key: out[key]})
                nxt, pos = out.logits[:, -1:].argmax(-1), pos + 1
            best = min(best, (time.perf_counter() - t0) / steps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--memory-contexts", default="1024,8192,32768")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--hf-context", type=int, default=4096, help="0: skip transformers")
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    mem_contexts = [int(c) for c in a.memory_contexts.split(",")]
    top = max(contexts + mem_contexts) + ROUNDS * a.steps + 1
    import kiln
    from kiln.runtime.artifact import read_manifest

    figures: dict = {"contexts": contexts, "steps": a.steps, "models": {}}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, m in models().items():
            t0 = time.perf_counter()
            art = kiln.compile(m, target="cpu", passes="O1", max_context=top).save(os.path.join(d, name))
            build_s = time.perf_counter() - t0
            kv = read_manifest(art)["kv_cache"]
            eng = kiln.load(art, kv_cache_tokens=top + 64, state_slots=1)
            dec = {c: kiln_decode(eng, c, a.steps) for c in contexts}
            hf = hf_decode(m, a.hf_context, a.steps) if a.hf_context else None
            state = int(kv.get("state_bytes_per_sequence", 0))
            # bytes a sequence holds at context L: its KV pages (attention) plus its fixed state (state-space)
            mem = {c: -(-c // kv["page_size"]) * kv["page_size"] * kv["bytes_per_token"] + state for c in mem_contexts}
            figures["models"][name] = {
                "params": sum(p.numel() for p in m.parameters()),
                "build_s": round(build_s, 1),
                "kiln_decode_tok_s": {str(c): round(1 / s, 1) for c, s in dec.items()},
                "hf_eager_decode_tok_s": {str(a.hf_context): round(1 / hf, 1)} if hf else {},
                "kv_bytes_per_token": kv["bytes_per_token"],
                "state_bytes_per_sequence": state,
                "bytes_per_sequence_at": {str(c): v for c, v in mem.items()},
            }
            rows.append((name, dec, hf, mem))
            eng.close()
    print(
        f"\n{'model':8} "
        + " ".join(f"{'kiln @' + str(c):>12}" for c in contexts)
        + f" {'hf @' + str(a.hf_context):>12}"
    )
    for name, dec, hf, _ in rows:
        print(
            f"{name:8} " + " ".join(f"{1 / dec[c]:>10.1f}/s" for c in contexts) + (f" {1 / hf:>10.1f}/s" if hf else "")
        )
    (_, sd, _, smem), (_, ad, _, amem) = rows
    for c in contexts:
        print(f"mamba2 / llama decode @ {c}: {ad[c] / sd[c]:.2f}x")
    for name, dec, hf, _ in rows:
        if hf and a.hf_context in dec:
            print(f"{name}: kiln / transformers eager decode @ {a.hf_context}: {hf / dec[a.hf_context]:.2f}x")
    print("\nbytes per sequence: " + ", ".join(f"@{c}: mamba2 {smem[c]:,} vs llama {amem[c]:,}" for c in mem_contexts))
    write_results("ssm", figures)


if __name__ == "__main__":
    main()
