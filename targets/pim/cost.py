"""Cost model and decode-step simulator of the `pim` target (GPU + PIM-enabled HBM3, see `pim_hw`).

Everything is per GPU; a tensor-parallel system of `tp` GPUs runs in lock-step, so step time is one GPU's time
and step energy is `tp` times one GPU's energy.

Work items
----------
Each op of a decode step becomes a `Work`: MACs, the bytes of its *resident operand* (weights or KV cache,
which live in memory and are read once per step), the activation bytes it moves, its *reuse* (input vectors
that meet each operand byte: batch x tokens for an FC layer, GQA group x tokens per sequence for attention),
and its PIM *phases* (operand bytes per group, input-vector bytes and output bytes per group per reuse
vector). Attention has two phases: K (q broadcast in, scores out) and V (probabilities in, context out);
softmax runs on the buffer die between them and is charged as the score read-out plus the probability
broadcast. Ops with no work (reshape/permute/slice...) cost nothing.

GPU time (roofline, AttAcc's utilisation factors)::

    t_gpu = overhead + max(2 * MACs / (peak_flops * 0.8), (resident + activation bytes) / (3.35 TB/s * 0.85))

PIM time (per phase, all pseudo-channels in parallel)::

    groups (heads, or 1 weight matrix) spread over pseudo-channels: G >= P -> one group per pseudo-channel,
      ceil(G/P) groups each; G < P -> each group over P // G pseudo-channels
    cols  = ceil(group bytes / (pCH per group * MAC units per pCH * 32 B))      per MAC unit
    rows  = ceil(cols / 32)                                                     (1 KB rows)
    t_mac = groups per pCH * (cols * reuse * nCCD_AB + rows * (nRCD + nRP)) * tCK
    t_vec = groups per pCH * reuse * (input bytes + output bytes / pCH per group) / (670.4 GB/s / 32)
    t_pim = overhead + sum over phases (t_mac + t_vec) + mode switch   (the GPU launches PIM kernels too)

  Assumptions: a MAC unit does 16 fp16 MACs per 32-byte column per reuse vector (reuse costs MAC slots, not
  re-activation); input vectors are written once per pseudo-channel (all-bank write) and every pseudo-channel
  of a group needs the whole vector; outputs are partitioned among a group's pseudo-channels; broadcast,
  MACs and read-out are not overlapped inside a phase; refresh is ignored.

Offload rule (`decide`): an op goes to PIM only when (1) its resident operand lives in PIM memory (weights /
KV cache per `PimHardware.weights_in_pim` / `kv_in_pim`; activations produced by the GPU never do), (2) its
reuse is below the break-even reuse `pim_stream_bw / gpu_eff_bw`, and (3) its PIM time is lower than its
GPU time.

Energy: GPU ops pay DRAM (28.7 pJ/B) + cache hierarchy (3.68 pJ/B) per byte moved and 0.32 pJ per MAC;
PIM ops pay the variant's per-byte array energy for each MAC-slot column read (reuse x operand bytes),
vector I/O (24.3 pJ/B) for broadcast and read-out bytes, and 0.32 pJ per MAC; collectives pay 10.4 pJ/B.

Step timing: ops are serial, except that with `pipeline_attention` a PIM attention overlaps with the
GPU's attention-block FCs (QKV, output projection) of the same layer head group by head group, as
AttAcc's --pipeopt: the pair costs max(fc, attn) + min(fc, attn) / heads_per_gpu.

Throughput as AttAcc reports it (`generation`): batch / mean decode-step latency over the generation stage
(contexts lin+1 .. lin+lout-1). The summarization (prefill) stage is simulated separately and, as in
AttAcc's main.py, not part of that number; `GenerationResult.e2e_tokens_per_s` includes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .hw import DEFAULT, PimHardware


@dataclass
class Work:
    """One op of a decode step, per GPU (see the module docstring)."""

    name: str
    op: str
    kind: str  # fc | attention | elementwise | embed | comm | view
    layer: int | None = None
    block: str = ""  # attn | mlp | ""
    macs: float = 0.0
    resident_bytes: float = 0.0
    act_bytes: float = 0.0
    reuse: float = 1.0
    groups: int = 1
    phases: list[tuple[float, float, float]] = field(default_factory=list)
    resident: str = "activations"  # weights | kv | activations
    comm_bytes: float = 0.0
    tp: int = 1
    heads: int = 1  # query heads per GPU (pipelining granularity)


@dataclass
class Cost:
    time_s: float
    energy_j: float
    detail: dict[str, float] = field(default_factory=dict)


# -- per-op costs --------------------------------------------------------------------------------------------------


def gpu_cost(w: Work, hw: PimHardware = DEFAULT) -> Cost:
    if w.kind == "view":
        return Cost(0.0, 0.0)
    if w.kind == "comm":
        n = w.tp
        t = 0.0 if n <= 1 else (n - 1) * (hw.collective_step_s + w.comm_bytes / n / hw.link_bw)
        return Cost(t, w.comm_bytes * hw.e_link_pj_b * 1e-12 if n > 1 else 0.0, {"comm": t})
    nbytes = w.resident_bytes + w.act_bytes
    t_c = 2 * w.macs / (hw.gpu_peak_flops * hw.gpu_compute_util)
    t_m = nbytes / hw.gpu_eff_bw
    t = hw.gpu_kernel_overhead_s + max(t_c, t_m)
    e = nbytes * (hw.e_gpu_dram_pj_b + hw.e_gpu_onchip_pj_b) * 1e-12 + w.macs * hw.e_mac_pj * 1e-12
    return Cost(t, e, {"compute": t_c, "memory": t_m, "overhead": hw.gpu_kernel_overhead_s})


def pim_cost(w: Work, hw: PimHardware = DEFAULT) -> Cost | None:
    """Time and energy of `w` in the PIM units, or None when the op has no PIM form."""
    if w.kind not in ("fc", "attention") or not w.phases:
        return None
    P, U, tck = hw.pch_total, hw.units_per_pch, hw.tck_ns * 1e-9
    G, r = max(1, int(w.groups)), max(1.0, float(w.reuse))
    if G >= P:
        pch_per_group, groups_per_pch = 1, math.ceil(G / P)
    else:
        pch_per_group, groups_per_pch = P // G, 1
    t_mac = t_vec = 0.0
    vec_bytes = col_reads = 0.0
    for op_bytes, in_b, out_b in w.phases:
        cols = math.ceil(op_bytes / (pch_per_group * U * hw.column_bytes))
        rows = math.ceil(cols / hw.cols_per_row)
        t_mac += groups_per_pch * (cols * r * hw.unit_interval + rows * (hw.nrcd + hw.nrp)) * tck
        per_pch = groups_per_pch * r * (in_b + out_b / pch_per_group)
        t_vec += per_pch / hw.pch_bw
        vec_bytes += G * r * (in_b * pch_per_group + out_b)
        col_reads += G * op_bytes * r
    t_mode = hw.mode_switch_cycles * tck
    t = hw.gpu_kernel_overhead_s + t_mac + t_vec + t_mode  # the GPU launches the kernel that issues PIM commands
    e = (col_reads * hw.e_pim_pj_b + vec_bytes * hw.e_vector_io_pj_b + w.macs * hw.e_mac_pj) * 1e-12
    return Cost(t, e, {"mac": t_mac, "vector_io": t_vec, "mode_switch": t_mode, "overhead": hw.gpu_kernel_overhead_s})


def resident_in_pim(w: Work, hw: PimHardware) -> bool:
    return (w.resident == "weights" and hw.weights_in_pim) or (w.resident == "kv" and hw.kv_in_pim)


def decide(w: Work, hw: PimHardware = DEFAULT, policy: str = "auto") -> tuple[str, str, Cost, Cost | None]:
    """The offload rule. Returns (placement, reason, gpu cost, pim cost)."""
    g = gpu_cost(w, hw)
    if w.kind == "view":
        return "gpu", "view: no data movement", g, None
    if w.kind == "comm":
        return "gpu", "collective over NVLink", g, None
    p = pim_cost(w, hw)
    if policy == "gpu":
        return "gpu", "GPU-only baseline", g, p
    if policy != "auto":
        raise ValueError(f"unknown placement policy {policy!r} (auto|gpu)")
    if not resident_in_pim(w, hw):
        return "gpu", f"operand ({w.resident}) not in PIM memory", g, p
    if p is None:
        return "gpu", f"{w.kind} op has no PIM form", g, None
    be = hw.break_even_reuse
    if w.reuse >= be:
        return "gpu", f"reuse {w.reuse:g} >= break-even {be:.2f}", g, p
    if p.time_s >= g.time_s:
        return (
            "gpu",
            f"reuse {w.reuse:g} < break-even {be:.2f} but PIM slower ({p.time_s * 1e6:.2f} us >= "
            f"{g.time_s * 1e6:.2f} us)",
            g,
            p,
        )
    return (
        "pim",
        f"reuse {w.reuse:g} < break-even {be:.2f} and PIM faster ({p.time_s * 1e6:.2f} us < {g.time_s * 1e6:.2f} us)",
        g,
        p,
    )


# -- a decode step -------------------------------------------------------------------------------------------------


@dataclass
class OpTime:
    name: str
    op: str
    kind: str
    layer: int | None
    placement: str
    reason: str
    time_s: float
    energy_j: float
    gpu_time_s: float
    pim_time_s: float | None


@dataclass
class StepResult:
    """One decode step: per-op rows, per-layer totals, and the step total (time per GPU, energy of all GPUs)."""

    ops: list[OpTime]
    layers: dict[Any, dict[str, float]]
    time_s: float
    energy_j: float
    tokens: int
    overlap_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time_s

    @property
    def j_per_token(self) -> float:
        return self.energy_j / self.tokens

    def breakdown(self) -> dict[str, dict[str, float]]:
        """Time and energy by (kind, placement)."""
        out: dict[str, dict[str, float]] = {}
        for o in self.ops:
            k = f"{o.kind}@{o.placement}"
            d = out.setdefault(k, {"time_s": 0.0, "energy_j": 0.0})
            d["time_s"] += o.time_s
            d["energy_j"] += o.energy_j
        if self.overlap_s:
            out["pipeline overlap"] = {"time_s": -self.overlap_s, "energy_j": 0.0}
        return out


def simulate_step(
    works: Iterable[Work],
    hw: PimHardware = DEFAULT,
    policy: str = "auto",
    tokens: int = 1,
    placements: dict[str, str] | None = None,
) -> StepResult:
    """Cost every op, apply the placement (the offload rule, or `placements[name]` when given), and add up."""
    ops: list[OpTime] = []
    works = list(works)
    tp = max([w.tp for w in works] + [1])
    layers: dict[Any, dict[str, float]] = {}
    for w in works:
        where, why, g, p = decide(w, hw, policy)
        if placements is not None and w.name in placements:
            forced = placements[w.name]
            if forced == "pim" and p is None:
                raise ValueError(f"{w.name} ({w.op}) has no PIM form but is placed on PIM")
            if forced != where:
                why = f"placed by annotation ({why})"
            where = forced
        c = p if where == "pim" else g
        assert c is not None  # "pim" is decided, or accepted as a placement, only for work with a PIM cost
        ops.append(
            OpTime(
                w.name, w.op, w.kind, w.layer, where, why, c.time_s, c.energy_j * tp, g.time_s, p.time_s if p else None
            )
        )
    total_overlap = 0.0
    by_layer: dict[Any, list[tuple[Work, OpTime]]] = {}
    for w, o in zip(works, ops):
        by_layer.setdefault(w.layer, []).append((w, o))
    for layer, items in by_layer.items():
        t = sum(o.time_s for _, o in items)
        e = sum(o.energy_j for _, o in items)
        ov = 0.0
        if hw.pipeline_attention:
            attn = [(w, o) for w, o in items if w.kind == "attention" and o.placement == "pim"]
            if attn:
                fc = sum(o.time_s for w, o in items if w.kind == "fc" and w.block == "attn" and o.placement == "gpu")
                ta = sum(o.time_s for _, o in attn)
                heads = max(1, attn[0][0].heads)
                ov = min(fc, ta) * (1 - 1 / heads)
        total_overlap += ov
        layers["head" if layer is None else layer] = {"time_s": t - ov, "energy_j": e, "overlap_s": ov}
    total_t = sum(o.time_s for o in ops) - total_overlap
    return StepResult(ops, layers, total_t, sum(o.energy_j for o in ops), tokens, total_overlap)


# -- shape specifications ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer by its shapes (no weights), run tensor-parallel over `tp` GPUs."""

    name: str
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    gated: bool = True  # SwiGLU (gate, up, down) vs a 2-matrix MLP with GELU
    rope: bool = True
    tp: int = 1


GPT3_175B = ModelShape("GPT-3 175B", 96, 12288, 96, 96, 128, 49152, 50257, gated=False, rope=False, tp=8)
SMOLLM2_135M = ModelShape("SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 49152)
LLAMA31_8B = ModelShape("Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 128256)


def fc_work(name: str, layer, block: str, m: int, n: int, k: int, b: int, tp: int = 1, heads: int = 1) -> Work:
    """y[m, n] = x[m, k] @ W[n, k]^T with W resident: one group, reuse m."""
    return Work(
        name,
        "linear",
        "fc",
        layer,
        block,
        macs=m * n * k,
        resident_bytes=n * k * b,
        act_bytes=(m * k + m * n) * b,
        reuse=m,
        groups=1,
        phases=[(n * k * b, k * b, n * b)],
        resident="weights",
        tp=tp,
        heads=heads,
    )


def attention_work(
    name: str,
    layer,
    batch: int,
    tokens: int,
    context: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    b: int,
    tp: int = 1,
) -> Work:
    """Decode attention of `tokens` new tokens per sequence over `context` cached positions (per GPU share)."""
    g = heads // kv_heads
    r = g * tokens
    groups = batch * kv_heads
    kv = groups * context * head_dim * b
    return Work(
        name,
        "cached_attention",
        "attention",
        layer,
        "attn",
        macs=2 * batch * heads * tokens * context * head_dim,
        resident_bytes=2 * kv,
        act_bytes=2 * batch * heads * tokens * head_dim * b,
        reuse=r,
        groups=groups,
        phases=[
            (context * head_dim * b, head_dim * b, context * b),
            (context * head_dim * b, context * b, head_dim * b),
        ],
        resident="kv",
        tp=tp,
        heads=heads,
    )


def ew_work(name: str, op: str, layer, nbytes: float, tp: int = 1, kind: str = "elementwise") -> Work:
    return Work(name, op, kind, layer, act_bytes=nbytes, tp=tp)


def decode_works(s: ModelShape, batch: int, context: int, spec: int = 0, hw: PimHardware = DEFAULT) -> list[Work]:
    """Per-GPU work of one decode step of `s` (tokens = 1 + spec per sequence) with `context` tokens attended.

    Tensor parallelism (Megatron): QKV/gate/up split by output, o_proj/down by input, one all-reduce after the
    attention block and one after the MLP; the LM head is vocab-parallel. Residual adds are fused into the norms.
    """
    b, tp, T = hw.dtype_bytes, s.tp, 1 + spec
    m = batch * T
    hq, hkv = max(1, s.heads // tp), max(1, s.kv_heads // tp)
    d, f = s.d_model, s.ffn // tp
    act = m * d * b
    w: list[Work] = [ew_work("embed", "embedding", None, 2 * act, tp, kind="embed")]
    for i in range(s.layers):
        w.append(ew_work(f"L{i}.norm1", "rms_norm", i, 3 * act, tp))
        w.append(fc_work(f"L{i}.qkv", i, "attn", m, (hq + 2 * hkv) * s.head_dim, d, b, tp, hq))
        if s.rope:
            w.append(ew_work(f"L{i}.rope", "rope", i, 2 * m * (hq + hkv) * s.head_dim * b, tp))
        w.append(attention_work(f"L{i}.attention", i, batch, T, context, hq, hkv, s.head_dim, b, tp))
        w.append(fc_work(f"L{i}.o_proj", i, "attn", m, d, hq * s.head_dim, b, tp, hq))
        if tp > 1:
            w.append(Work(f"L{i}.allreduce1", "allreduce", "comm", i, comm_bytes=act, tp=tp))
        w.append(ew_work(f"L{i}.norm2", "rms_norm", i, 3 * act, tp))
        if s.gated:
            w.append(fc_work(f"L{i}.gate_up", i, "mlp", m, 2 * f, d, b, tp))
            w.append(ew_work(f"L{i}.act", "silu_mul", i, 3 * m * f * b, tp))
        else:
            w.append(fc_work(f"L{i}.ff1", i, "mlp", m, f, d, b, tp))
            w.append(ew_work(f"L{i}.act", "gelu", i, 2 * m * f * b, tp))
        w.append(fc_work(f"L{i}.down", i, "mlp", m, d, f, b, tp))
        if tp > 1:
            w.append(Work(f"L{i}.allreduce2", "allreduce", "comm", i, comm_bytes=act, tp=tp))
    w.append(ew_work("final_norm", "rms_norm", None, 3 * act, tp))
    w.append(fc_work("lm_head", None, "head", batch, max(1, s.vocab // tp), d, b, tp))
    return w


def prefill_time(s: ModelShape, batch: int, lin: int, hw: PimHardware = DEFAULT) -> Cost:
    """Summarization stage on the GPU (as in AttAcc): FCs over batch*lin tokens, causal attention lin x lin/2."""
    b, tp = hw.dtype_bytes, s.tp
    m = batch * lin
    hq, hkv = max(1, s.heads // tp), max(1, s.kv_heads // tp)
    d, f = s.d_model, s.ffn // tp
    works = []
    for i in range(s.layers):
        works.append(fc_work("qkv", i, "attn", m, (hq + 2 * hkv) * s.head_dim, d, b, tp))
        works.append(
            Work(
                "attn",
                "attention",
                "elementwise",
                i,
                macs=2 * batch * hq * lin * lin / 2 * s.head_dim,
                act_bytes=batch * (hq + 2 * hkv) * lin * s.head_dim * b,
                tp=tp,
            )
        )
        works.append(fc_work("o", i, "attn", m, d, hq * s.head_dim, b, tp))
        works.append(fc_work("ff_in", i, "mlp", m, (2 if s.gated else 1) * f, d, b, tp))
        works.append(fc_work("ff_out", i, "mlp", m, d, f, b, tp))
        works.append(ew_work("norms", "rms_norm", i, 6 * m * d * b, tp))
        if tp > 1:
            works.append(Work("ar", "allreduce", "comm", i, comm_bytes=2 * m * d * b, tp=tp))
    r = simulate_step(works, hw, policy="gpu", tokens=m)
    return Cost(r.time_s, r.energy_j)


@dataclass
class GenerationResult:
    batch: int
    lin: int
    lout: int
    policy: str
    mean_step_s: float
    mean_step_j: float
    prefill_s: float
    prefill_j: float

    @property
    def tokens_per_s(self) -> float:
        """AttAcc's metric: batch / mean generation-step latency."""
        return self.batch / self.mean_step_s

    @property
    def e2e_tokens_per_s(self) -> float:
        steps = self.lout - 1
        return self.batch * steps / (self.prefill_s + steps * self.mean_step_s)


def generation(
    s: ModelShape, batch: int, lin: int, lout: int, hw: PimHardware = DEFAULT, policy: str = "auto", samples: int = 32
) -> GenerationResult:
    """Generate `lout` tokens after a `lin`-token prompt: stages 1..lout-1 attend over lin+stage tokens
    (AttAcc's generation loop). Step time is piecewise linear in the context, so the mean over all stages is
    taken from `samples` evenly spaced stages (exact ends, midpoint rule in between)."""
    stages = list(range(1, lout))
    n = min(samples, len(stages))
    picks = [stages[round((k + 0.5) * len(stages) / n - 0.5)] for k in range(n)]
    ts, es = [], []
    for st in picks:
        r = simulate_step(decode_works(s, batch, lin + st, 0, hw), hw, policy, tokens=batch)
        ts.append(r.time_s)
        es.append(r.energy_j)
    pf = prefill_time(s, batch, lin, hw)
    return GenerationResult(batch, lin, lout, policy, sum(ts) / n, sum(es) / n, pf.time_s, pf.energy_j)
