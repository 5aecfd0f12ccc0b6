"""bench/serving.py: the GPU host's random-weights mode run end to end on a tiny CPU artifact (so the GPU run
does not fail on a typo), its workload and sustainable-rate arithmetic, and its refusal of bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import serving  # bench/serving.py
import serving_models
import serving_workload as sw


def test_random_weights_mode_runs_sweep_repeats_and_prefix(artifacts, tmp_path):
    """The GPU command's code path, on the CPU: seeded random weights made by gpu_decode's seeded_model,
    random prompt ids, a two-rate sweep of static and continuous, two repeats, the prefix workload."""
    out = tmp_path / "serving.json"
    argv = [
        "--artifact", artifacts["llama"], "--random-weights", "--requests", "10", "--prompt-median", "12",
        "--prompt-max", "48", "--output-median", "6", "--output-max", "24", "--rates", "50,1000",
        "--ttft-limit", "5", "--policies", "static,continuous", "--repeats", "2", "--max-batch", "4",
        "--kv-cache-tokens", "2048", "--prefix", "--prefix-tokens", "48", "--prefix-requests", "6",
        "--json", str(out),
    ]  # fmt: skip
    figures = serving.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    assert figures["repeats"] == 2 and figures["rates"] == [50.0, 1000.0]
    for pol in ("static", "continuous"):
        entry = figures["policies"][pol]
        for rate in ("50", "1000"):
            m = entry["per_rate"][rate]
            assert len(m["runs"]) == 2 and m["requests_finished"] == 10, (pol, rate, m)
            assert m["tokens_per_s"] > 0 and m["ttft_p99_s"] >= m["ttft_p50_s"]
        # a 5 s limit holds at both rates for 10 tiny requests: the highest swept rate, a lower bound
        assert entry["highest_passing_rate"] == 1000.0 and entry["saturated_in_sweep"] is False
    assert figures["continuous_over_static_rate"] == pytest.approx(1.0)
    assert figures["continuous_over_static_highest_passing_rate"] == 1.0
    assert figures["ratio_rate"] == 1000.0 and figures["continuous_over_static_throughput"] > 0
    assert figures["greedy_outputs_identical"] is True  # the same ids and weights; fp32 CPU kernels per row
    pre = figures["prefix"]
    assert pre["workload"]["shared_prefix_share"] > 0.5
    # every request after the first finds the 48-token system prompt's whole pages cached
    assert pre["hit_rate"] > 0.4 and pre["hit_rate_uncached"] == 0.0
    assert pre["cached"]["requests_finished"] == pre["uncached"]["requests_finished"] == 6


def test_a_workload_the_artifact_cannot_serve_is_refused_before_any_run(artifacts):
    argv = ["--artifact", artifacts["llama"], "--random-weights", "--requests", "4", "--prompt-max", "64",
            "--output-max", "16", "--prefix", "--prefix-tokens", "300"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        serving.main(argv)
    assert "needs" in str(e.value.code) and "--prefix-tokens" in str(e.value.code)


def test_random_weights_are_seeded(artifacts):
    """Two calls give the same weights (the GPU host and a rerun see the same model), in the manifest's shapes."""
    from kiln.runtime.artifact import read_manifest

    man = read_manifest(artifacts["llama"])
    a, b = serving_models.random_weights(man, "manifest"), serving_models.random_weights(man, "manifest")
    assert set(a) == {s["name"] for s in man["weights"]}
    for s in man["weights"]:
        x, y = (w.detach().numpy() if hasattr(w, "detach") else w for w in (a[s["name"]], b[s["name"]]))
        assert list(x.shape) == list(s["shape"]) and np.array_equal(x, y), s["name"]


def test_workload_is_fixed_by_its_seed_and_rates_rescale_arrivals():
    tokens = serving_models.random_tokens(1000)
    shape = sw.Shape(requests=200, prompt_median=50, prompt_max=400, output_median=20, output_max=100, seed=3)
    a, b = sw.make_workload(shape, tokens), sw.make_workload(shape, tokens)
    assert a.prompts == b.prompts and a.outputs == b.outputs
    slow, fast = a.at(2.0), a.at(8.0)
    assert [r[1:] for r in slow] == [r[1:] for r in fast]
    assert [4 * r[0] for r in fast] == pytest.approx([r[0] for r in slow])
    assert slow[-1][0] / 200 == pytest.approx(0.5, rel=0.25)  # Poisson at 2/s: mean gap 0.5 s
    lens = [len(p) for p in a.prompts]
    assert min(lens) >= sw.MIN_TOKENS and max(lens) <= 400 and max(lens) > 3 * np.median(lens)  # a long tail
    assert 10 <= np.median(a.outputs) <= 30 and max(a.outputs) <= 100
    pre = sw.make_workload(sw.Shape(requests=20, prompt_median=10, prefix_tokens=30), tokens)
    assert all(p[:30] == pre.prompts[0][:30] for p in pre.prompts) and pre.stats["shared_prefix_share"] > 0.6


def test_sustainable_rate_interpolates_between_pass_and_fail():
    r = sw.sustainable_rate([4, 1, 2], [3.0, 0.5, 1.0], limit=2.0)  # unsorted on purpose
    assert r["highest_passing"] == 2.0 and r["interpolated"] == pytest.approx(3.0) and r["saturated_in_sweep"]
    r = sw.sustainable_rate([1, 2, 4], [0.5, None, 0.1], limit=2.0)  # not run counts as over; no rate after a fail
    assert r["highest_passing"] == 1.0 and r["interpolated"] == 1.0
    r = sw.sustainable_rate([1, 2], [0.5, 1.0], limit=2.0)
    assert r["interpolated"] == 2.0 and not r["saturated_in_sweep"]
    assert sw.sustainable_rate([1, 2], [2.5, 3.0], limit=2.0)["interpolated"] == 0.0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--rates", "fast"], "--rates takes comma-separated numbers"),
        (["--rates", "-1"], "--rates needs at least one rate >= 0"),
        (["--policies", "static,fifo"], "--policies takes some of"),
        (["--ttft-limit", "0"], "--ttft-limit must be > 0"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        serving.parse_args(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_gpu_mode_imports_only_the_runtime_side():
    """The GPU host has TVM's runtime only: the bench modules and the cuda weight maker import nothing from
    kiln's compile side or TVM's compiler."""
    code = (
        f"import sys; sys.path.insert(0, {BENCH!r}); import serving, serving_models, serving_workload, gpu_decode; "
        "import kiln.targets.cuda.weights, kiln.runtime.engine, kiln.runtime.serving; "
        "bad = [m for m in sys.modules if m.startswith(('tvm.relax', 'tvm.script', 'kiln.api', 'kiln.trace', "
        "'kiln.passes', 'kiln.targets.cpu'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fixed_batch_throughput_and_its_floor(engines):
    """bench/fixed_batch.py (the GPU's `--fixed-batches`) on a tiny CPU engine: tokens/s from the first decode step,
    and a floor made of the bytes the step streams and its FLOPs at the given bandwidth and GEMM rate."""
    from fixed_batch import decode_throughput, model_facts

    eng = engines["llama"]
    facts = model_facts(eng)
    weights = sum(int(np.prod(w.shape)) * np.dtype(str(w.dtype)).itemsize for w in eng.weights)
    assert 0 < facts["streamed_bytes"] <= weights
    m = eng.manifest["model"]
    assert facts["kv_bytes_per_token"] == 2 * m["num_hidden_layers"] * m["num_key_value_heads"] * 4 * (
        m["hidden_size"] // m["num_attention_heads"]
    )  # the CPU artifact's cache is fp32
    bw, rate = 1e12, 1e13
    out = decode_throughput(eng, [1, 3], 40, 8, bw, rate)
    for b in (1, 3):
        r = out[f"batch{b}"]
        assert r["decode_tok_s"] > 0 and 0 < r["engine_step_ms"] <= r["step_ms"]
        assert r["bytes_floor_ms"] == pytest.approx(
            (facts["streamed_bytes"] + facts["kv_bytes_per_token"] * b * 40) / bw * 1e3
        )
        assert r["floor_ms"] == max(r["bytes_floor_ms"], r["flops_floor_ms"])
        assert r["share_of_floor"] == pytest.approx(r["floor_ms"] / r["step_ms"])
    assert out["batch3"]["flops_floor_ms"] == pytest.approx(3 * out["batch1"]["flops_floor_ms"])
