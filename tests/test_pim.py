"""The simulated `pim` target: offload rule at its boundaries, functional equality with `cpu`, config
validation, and the AttAcc validation table."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import kiln.targets.pim.place_pim  # noqa: F401  (registers place-pim until passes/__init__ imports it)
from kiln.targets.pim.cost import GPT3_175B, attention_work, decide, ew_work, fc_work, generation
from kiln.targets.pim.graph import simulate_graph
from kiln.targets.pim.hw import DEFAULT, PimConfigError, PimHardware

HW = DEFAULT
BE = HW.break_even_reuse  # 10.40 for the default config


# -- offload rule -----------------------------------------------------------------------------------------------


def _attn(heads: int, kv_heads: int = 1, tokens: int = 1):
    # 160 KV groups (one per pseudo-channel), 8k context: large enough that PIM wins below break-even
    return attention_work(
        "a", 0, batch=160, tokens=tokens, context=8192, heads=heads, kv_heads=kv_heads, head_dim=128, b=2
    )


def test_break_even_is_between_10_and_11():
    assert 10 < BE < 11


@pytest.mark.parametrize("heads,tokens", [(10, 1), (5, 2)])  # GQA group x speculative tokens = 10
def test_reuse_just_below_break_even_goes_to_pim(heads, tokens):
    where, why, g, p = decide(_attn(heads, tokens=tokens), HW)
    assert where == "pim" and p.time_s < g.time_s, why


@pytest.mark.parametrize("heads,tokens", [(11, 1), (4, 3)])  # reuse 11, 12 >= 10.4
def test_reuse_at_or_above_break_even_stays_on_gpu(heads, tokens):
    where, why, _, _ = decide(_attn(heads, tokens=tokens), HW)
    assert where == "gpu" and "break-even" in why


def test_fc_reuse_boundary():
    below, above = int(BE), int(BE) + 1
    w_above = fc_work("fc", 0, "mlp", above, 8192, 8192, 2)
    assert decide(w_above, HW)[0] == "gpu" and "break-even" in decide(w_above, HW)[1]
    where, why, g, p = decide(fc_work("fc", 0, "mlp", below, 8192, 8192, 2), HW)
    assert where == ("pim" if p.time_s < g.time_s else "gpu")  # below break-even the time comparison decides
    assert decide(fc_work("fc", 0, "mlp", 1, 8192, 8192, 2), HW)[0] == "pim"


def test_operand_not_in_pim_memory_stays_on_gpu():
    assert decide(_attn(10), HW)[0] == "pim"
    where, why, _, _ = decide(_attn(10), HW.with_(kv_in_pim=False))
    assert where == "gpu" and "not in PIM memory" in why
    where, why, _, _ = decide(fc_work("fc", 0, "mlp", 1, 8192, 8192, 2), HW.with_(weights_in_pim=False))
    assert where == "gpu" and "not in PIM memory" in why
    where, why, _, _ = decide(ew_work("n", "rms_norm", 0, 1e6), HW)
    assert where == "gpu" and "activations" in why


# -- the pass and the target on a traced model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_o1(models):
    # the `traced` fixture's tiny Llama, traced alone (tracing all four families would take most of the budget)
    from kiln.passmgr import run_pipeline
    from kiln.trace import trace

    return run_pipeline(trace(models["llama"], max_tokens=256), "O1")[0]


def test_place_pim_annotates_every_op(llama_o1):
    from kiln.passmgr import run_pipeline

    for batch, rule in ((1, "< break-even"), (64, ">= break-even")):
        g, _ = run_pipeline(llama_o1, f"place-pim{{batch={batch},context=4096}}")
        ops = [n for n in g.nodes if n.op not in ("input", "param", "const")]
        assert all(n.attrs.get("placement") in ("gpu", "pim") and n.attrs.get("placement_reason") for n in ops)
        assert all(n.attrs["placement"] == "gpu" for n in ops if n.op in ("rms_norm", "rope", "add"))
        assert all(rule in n.attrs["placement_reason"] for n in ops if n.op in ("gated_mlp", "linear"))
        assert g.meta["pim"]["batch"] == batch
        step = simulate_graph(g, batch, 4096)
        assert {o.name: o.placement for o in step.ops} == {n.name: n.attrs["placement"] for n in ops}


def _prefill(build, graph, ids):
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from kiln.targets.common.layouts import materialize

    dev = tvm.cpu()
    vm = VirtualMachine(build.executable, dev)
    weights = tuple(tvm.runtime.tensor(materialize(s, graph.params), dev) for s in build.weight_specs)
    kv = graph.meta["kv_cache"]
    caches = tuple(
        tvm.runtime.tensor(np.zeros((4, 2, l["kv_heads"], kv["page_size"], l["head_dim"]), "float32"), dev)
        for l in kv["layers"]
    )
    n = len(ids)
    pages = -(-n // kv["page_size"])
    args = [np.asarray([ids], np.int64), np.arange(n, dtype=np.int32)[None], np.arange(pages, dtype=np.int32)[None]]
    return vm["prefill"](*[tvm.runtime.tensor(a, dev) for a in args], caches, weights).numpy()


def test_pim_target_output_equals_cpu_target(llama_o1):
    from kiln.entry import EntryPoint
    from kiln.targets.cpu.target import CpuTarget
    from kiln.targets.pim.target import PimTarget

    tgt = PimTarget(batch=4, context=128)
    only_prefill = {"prefill": EntryPoint("prefill", {"batch": 1})}  # one entry point keeps the two TVM builds fast
    pim = tgt.build(llama_o1, only_prefill)
    cpu = CpuTarget().build(llama_o1, only_prefill)
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    a, b = _prefill(pim, llama_o1, ids), _prefill(cpu, llama_o1, ids)
    assert np.abs(a - b).max() <= 1e-6 * max(1.0, np.abs(b).max())
    assert pim.target["name"] == "pim" and set(pim.timeline) == {"gpu", "pim"}
    step = pim.timeline["pim"]
    assert step.time_s > 0 and step.energy_j > 0 and len(step.layers) == 3  # 2 layers + head


# -- hardware config validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("stacks", 0),
        ("stack_bw", -1.0),
        ("nccd_ab", 0),
        ("e_mac_pj", -0.1),
        ("gpu_mem_util", 1.5),
        ("variant", "rank"),
        ("power_limit", "yes"),
    ],
)
def test_invalid_config_is_refused_naming_the_field(field, value):
    with pytest.raises(PimConfigError) as e:
        PimHardware(**{field: value})
    assert e.value.field == field and field in str(e.value)


def test_every_parameter_has_a_source():
    src = PimHardware.sources()
    assert set(src) == {f.name for f in dataclasses.fields(PimHardware)} and all(src.values())


# -- validation against AttAcc --------------------------------------------------------------------------------------

# scale-snu/attacc_simulator main.py --gpu H100 --ngpu 8 --model GPT-175B --lin 2048 --lout 2048 --pim bank
# --powerlimit --ffopt --pipeopt (shipped cycle table): tokens/s GPU-only, GPU+PIM; energy per decode step (J).
ATTACC = {  # batch: (gpu tok/s, pim tok/s, gpu J/step, pim J/step)
    21: (506, 868, None, None),
    48: (727, 1679, 42.5, 22.7),
    78: (881, 2527, None, None),
}


@pytest.mark.parametrize("batch", sorted(ATTACC))
def test_attacc_speedup_within_15_percent(batch):
    g0, p0, eg0, ep0 = ATTACC[batch]
    gpu = generation(GPT3_175B, batch, 2048, 2048, DEFAULT, "gpu")
    pim = generation(GPT3_175B, batch, 2048, 2048, DEFAULT, "auto")
    ours, theirs = pim.tokens_per_s / gpu.tokens_per_s, p0 / g0
    assert abs(ours / theirs - 1) < 0.15, (batch, ours, theirs)
    if eg0 is not None:  # energy saving (GPU-only J / GPU+PIM J)
        assert abs((gpu.mean_step_j / pim.mean_step_j) / (eg0 / ep0) - 1) < 0.15
