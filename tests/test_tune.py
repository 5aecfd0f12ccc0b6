"""Mixed precision and `kiln tune`: per-weight plans (structure, negative, numbers), the sensitivity
estimate and its cache, the search within its budget, the CLI's refusals."""

import json
import math
import os

import pytest
import torch

import kiln
from kiln import interp
from kiln.calib import perplexity_and_kl
from kiln.errors import KilnError, PassError
from kiln.passes.quantize_weights import quantize_weights
from kiln.passmgr import run_pipeline
from kiln.sensitivity import COUNTERS, find_units, sensitivity
from kiln.tuning import parse_budget

BASE = "canonicalize,fuse-norms,fuse-rope,fuse-attention"


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * math.log10(float((ref**2).sum() / ((ref - x) ** 2).sum()))


@pytest.fixture(scope="module")
def tied():
    from conftest import tiny_model

    return tiny_model("llama", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def base(tied):
    from kiln.trace import trace

    return run_pipeline(trace(tied, max_tokens=256), BASE)[0]


def mixed_plan(g) -> dict[str, str]:
    """Layer 0 int8, layer 1 int4 g16, v_proj of layer 1 kept fp32, output layer int8."""
    plan = {}
    for u in find_units(g):
        for w in u.weights:
            plan[w] = "int8" if ".layers.0." in w or w.startswith("lm_head") else "int4_g16"
    plan["model.layers.1.self_attn.v_proj.weight"] = "none"
    return plan


def test_plan_is_applied_as_given(base):
    plan = mixed_plan(base)
    g = quantize_weights(base, plan=plan)
    for n in g.nodes:
        if n.op != "linear":
            continue
        w = n.inputs[1]
        name = w.attrs["name"] if w.op == "param" else w.inputs[0].attrs["name"].rsplit(".", 2)[0]
        want = plan[name]
        assert (w.op == "param") == (want == "none"), name
        if want != "none":
            assert w.attrs["scheme"] == want, name
    emb = g.find("embedding")[0]
    assert emb.inputs[0].op == "qweight" and emb.inputs[0].attrs["scheme"] == "int8"  # tied: the head's codes
    assert g.meta["quant"]["plan"] == dict(sorted(plan.items()))


def test_plan_refuses_unknown_weights_and_awq(base):
    with pytest.raises(PassError, match="no linear layer reads"):
        quantize_weights(base, plan={"model.layers.0.q_proj": "int8"})
    with pytest.raises(PassError, match="not awq"):
        quantize_weights(base, plan=mixed_plan(base), method="awq")


def test_fuse_mlp_leaves_differently_stored_gate_and_up_apart(base):
    plan = {w: "int8" for u in find_units(base) for w in u.weights}
    fused, _ = run_pipeline(quantize_weights(base, plan=plan), "fuse-mlp")
    assert len(fused.find("gated_mlp")) == 2
    plan["model.layers.0.mlp.up_proj.weight"] = "int4_g16"
    split, _ = run_pipeline(quantize_weights(base, plan=plan), "fuse-mlp")
    assert len(split.find("gated_mlp")) == 1  # layer 0's gate and up differ: not one kernel


def test_mixed_build_runs_and_stays_close_to_fp32(tied, base, tmp_path):
    plan = mixed_plan(base)
    path = kiln.compile(tied, target="cpu", quant_plan=plan).save(str(tmp_path / "mixed"))
    m = json.load(open(os.path.join(path, "manifest.json")))
    assert m["quantization"]["plan"]["model.layers.1.self_attn.v_proj.weight"] == "none"
    assert "Quantization plan" in open(os.path.join(path, "report.md")).read()
    eng = kiln.load(path)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    pages = eng.pool.alloc(1)
    got = torch.from_numpy(eng.prefill(ids[0].tolist(), pages))
    eng.pool.release(pages)
    ref = interp.run(base, {"input_ids": ids})[0][0, -1]
    assert sqnr_db(ref, got) > 20.0
    out = eng.generate([ids[0].tolist()], kiln.SamplingParams(max_tokens=6))[0]
    assert len(out.token_ids) == 6


def test_sensitivity_tracks_measured_kl_and_is_cached(base, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    toks = [torch.randint(0, 97, (64,), generator=gen).tolist() for _ in range(4)]
    before = dict(COUNTERS)
    est = sensitivity(base, toks, ["int8", "int4"])
    again = sensitivity(base, toks, ["int8", "int4"])
    assert again == est
    assert COUNTERS["computed"] == before["computed"] + 1 and COUNTERS["cache_hits"] == before["cache_hits"] + 1
    sensitivity(base, toks[:3], ["int8", "int4"])  # other calibration text: a new analysis
    assert COUNTERS["computed"] == before["computed"] + 2
    units = find_units(base)
    assert len(units) == 13 and len(units[-1].embeddings) == 1  # gate+up as one unit; the head tied
    _, _, ref = perplexity_and_kl(base, toks)
    est_kl, measured = [], []
    for u in units:
        g = quantize_weights(base, plan={w: ("int4" if w in u.weights else "none") for v in units for w in v.weights})
        measured.append(perplexity_and_kl(g, toks, ref)[1])
        est_kl.append(est[u.key]["int4"])
    rank = lambda xs: [sorted(xs).index(x) for x in xs]  # noqa: E731
    ra, rb = rank(est_kl), rank(measured)
    n = len(ra)
    rho = 1 - 6 * sum((a - b) ** 2 for a, b in zip(ra, rb)) / (n * (n * n - 1))
    assert rho > 0.7, (est_kl, measured)
    assert all(est[u.key]["int8"] < est[u.key]["int4"] for u in units)


@pytest.mark.parametrize("budget", ["kl:0.0005", "ppl+0.05%"])
def test_search_respects_the_budget(tied, tmp_path, monkeypatch, budget):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    res = kiln.tune(
        tied,
        budget=budget,
        max_trials=6,
        schemes=("int8", "int4_g32", "int4"),
        references=("int8",),
        calib_windows=2,
        eval_tokens=128,
        window=64,
        out=str(tmp_path / "out"),
        build=False,
    )
    b = parse_budget(budget)
    c = res.chosen
    assert c.within_budget and b.ok(c.ppl, c.kl, res.ppl_fp32)
    assert all(x.within_budget == b.ok(x.ppl, x.kl, res.ppl_fp32) for x in res.candidates)
    assert len([x for x in res.candidates if x.kind != "reference"]) <= 6
    assert c.weight_bytes <= min(x.weight_bytes for x in res.candidates if x.within_budget)
    doc = json.load(open(res.report["tune"]))
    assert doc["chosen"]["plan"] == c.plan and len(doc["frontier"]) == len(res.candidates)
    assert json.load(open(res.report["plan"])) == c.plan


@pytest.mark.parametrize("text", ["ppl+abc", "ppl-1%", "size", "kl:", "1%"])
def test_bad_budget_is_refused(text, tmp_path, capsys):
    with pytest.raises(KilnError, match="ppl\\+1%"):
        parse_budget(text)
    from kiln.cli import main

    assert main(["tune", "smollm2-135m", "-o", str(tmp_path / "o"), "--budget", text]) == 1
    assert "budget" in capsys.readouterr().err


def test_budget_forms():
    assert parse_budget("ppl+1%").ok(101.0, 0.0, 100.0) and not parse_budget("ppl+1%").ok(101.1, 0.0, 100.0)
    assert parse_budget("ppl+0.5").ok(100.5, 1.0, 100.0)
    assert parse_budget("kl:0.01").ok(500.0, 0.01, 100.0) and not parse_budget("KL:0.01").ok(0, 0.02, 0)


@pytest.mark.slow
def test_tune_on_smollm2_stays_within_budget(tmp_path):
    import importlib.util

    if importlib.util.find_spec("gensim") is None:  # the Lee corpus ships in its wheel (never imported)
        pytest.skip("the Lee corpus needs `pip install --no-deps gensim==4.4.0`")
    res = kiln.tune("smollm2-135m", budget="ppl+5%", max_trials=2, eval_tokens=256, references=(), build=False)
    assert res.chosen.within_budget and res.chosen.weight_bytes < 0.5 * res.references[0].weight_bytes


def test_cli_tune_then_build_with_its_plan(tied, tmp_path, monkeypatch, capsys):
    from kiln.cli import main

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "tiny")
    tied.save_pretrained(folder)
    out = tmp_path / "tuned"
    args = ["tune", folder, "-o", str(out), "--budget", "kl:0.001", "--max-trials", "3", "--eval-tokens", "256"]
    assert main(args + ["--schemes", "int8,int4_g32", "--no-build"]) == 0
    plan = json.load(open(out / "report" / "plan.json"))
    assert set(plan.values()) <= {"none", "int8", "int4_g32"} and len(plan) == 15
    assert main(["build", folder, "-o", str(tmp_path / "art"), "--quant-plan", str(out / "report" / "plan.json")]) == 0
    m = json.load(open(tmp_path / "art" / "manifest.json"))
    assert m["quantization"]["plan"] == {k: plan[k] for k in sorted(plan)}
