"""convert-gqa and convert-mla: structure, exactness at the identity settings, refusals, compiled == interpreter."""

from __future__ import annotations

import pytest
import torch
from test_attention import compiled_vs_interpreter, rel_err

import kiln
import kiln.interp as interp
from kiln.errors import PassError
from kiln.passes import REGISTRY, run_counted
from kiln.pipeline import parse_pipeline

FRONT = "canonicalize,fuse-norms,fuse-rope,fuse-attention,fuse-mlp"
IDS = torch.tensor([[1, 5, 9, 3, 22, 7, 8, 60, 2, 13, 33]])


@pytest.fixture(scope="module")
def llama(traced):
    g, _ = kiln.run_pipeline(traced["llama"], FRONT)  # 6 query heads, 3 KV heads, head_dim 8, width 48
    return g


def logits(g):
    return interp.run(g, {"input_ids": IDS})[0]


def test_convert_gqa_structure_and_numbers(llama) -> None:
    same, rec = kiln.run_pipeline(llama, "convert-gqa{kv_heads=3}")
    assert rec[-1].rewrites == {} and rel_err(logits(same), logits(llama)) == 0.0  # unchanged kv_heads: exact
    mqa, rec = kiln.run_pipeline(llama, "convert-gqa{kv_heads=1}")
    assert rec[-1].rewrites == {"kv-heads-merged": 4} and not rec[-1].exact
    for a in mqa.find("attention"):
        assert int(a.inputs[1].type.shape[1]) == 1 and int(a.inputs[2].type.shape[1]) == 1
    wk = llama.params["model.layers.0.self_attn.k_proj.weight"]
    torch.testing.assert_close(mqa.params["model.layers.0.self_attn.k_proj.weight"], wk.reshape(3, 8, 48).mean(0))
    assert mqa.meta["attention_variant"] == {"kind": "mqa", "kv_heads": 1}
    err = rel_err(logits(mqa), logits(llama))
    assert 1e-3 < err < 2.0  # lossy but the same model


def test_convert_gqa_pooled_heads_equal_pooled_keys(traced) -> None:
    # MHA (6 KV heads) -> GQA with 2 groups: keys of the converted model are the means of the old ones
    from conftest import tiny_model

    from kiln.trace import trace

    g, _ = kiln.run_pipeline(trace(tiny_model("llama", num_key_value_heads=6), max_tokens=64), FRONT)
    g2, _ = kiln.run_pipeline(g, "convert-gqa{kv_heads=2}")
    _, env = interp.run(g, {"input_ids": IDS}, return_env=True)
    _, env2 = interp.run(g2, {"input_ids": IDS}, return_env=True)
    a, a2 = g.find("attention")[0], g2.find("attention")[0]
    k, k2 = env[a.inputs[1]], env2[a2.inputs[1]]  # [1, 6, T, 8] -> [1, 2, T, 8]
    torch.testing.assert_close(k2, k.reshape(1, 2, 3, -1, 8).mean(2), rtol=1e-5, atol=1e-5)


def test_convert_refusals(llama, traced) -> None:
    with pytest.raises(PassError, match="kv_heads=2 does not divide the 3 KV heads.*one of 1, 3"):
        kiln.run_pipeline(llama, "convert-gqa{kv_heads=2}")
    with pytest.raises(PassError, match="rank=25 is impossible.*choose 1..24"):
        kiln.run_pipeline(llama, "convert-mla{rank=25,rope_dims=8}")
    with pytest.raises(PassError, match="rope_dims=3 must be even"):
        kiln.run_pipeline(llama, "convert-mla{rank=4,rope_dims=3}")
    cached, _ = kiln.run_pipeline(llama, "kv-cache")
    for p in ("convert-gqa{kv_heads=1}", "convert-mla{rank=4,rope_dims=2}"):
        with pytest.raises(PassError, match="before kv-cache"):
            kiln.run_pipeline(cached, p)
        with pytest.raises(PassError, match="before kv-cache"):  # the pass's own guard, without the pass manager
            run_counted(REGISTRY[p.split("{")[0]], cached, parse_pipeline(p)[0][1])
    with pytest.raises(PassError, match="no attention op"):
        run_counted(REGISTRY["convert-gqa"], traced["llama"], {"kv_heads": 1})
    with pytest.raises(
        PassError, match="'convert-gqa' requires 'fuse-attention'.*add fuse-attention before convert-gqa"
    ):
        kiln.run_pipeline(traced["llama"], "convert-gqa{kv_heads=1}")
    qwen, _ = kiln.run_pipeline(traced["qwen2"], FRONT)
    with pytest.raises(PassError, match="have biases"):
        kiln.run_pipeline(qwen, "convert-mla{rank=8,rope_dims=2}")
    gpt2, _ = kiln.run_pipeline(traced["gpt2"], "canonicalize,fuse-attention")
    with pytest.raises(PassError, match="not rotary"):
        kiln.run_pipeline(gpt2, "convert-mla{rank=8,rope_dims=2}")


def test_convert_mla_exact_at_full_rank_and_full_rope(llama) -> None:
    g, rec = kiln.run_pipeline(llama, "convert-mla{rank=24,rope_dims=8}")
    assert rec[-1].rewrites == {"mla": 2} and not g.find("attention")
    assert rel_err(logits(g), logits(llama)) < 1e-5


def test_convert_mla_partial_rope_and_truncation_are_lossy_but_close(llama) -> None:
    full = logits(llama)
    # dropping rotation on half the frequencies at full rank costs a little; truncating the rank more
    e_rope = rel_err(logits(kiln.run_pipeline(llama, "convert-mla{rank=36,rope_dims=4}")[0]), full)
    e_rank = rel_err(logits(kiln.run_pipeline(llama, "convert-mla{rank=12,rope_dims=4}")[0]), full)
    assert 0 < e_rope < 0.05 and e_rope < e_rank


def test_convert_mla_cache_layout_and_compiled_equals_interpreter(llama) -> None:
    g, _ = kiln.run_pipeline(llama, "convert-mla{rank=12,rope_dims=2},kv-cache{page_size=4},canonicalize")
    kv = g.meta["kv_cache"]
    # one row per token: 12 latent + 3 KV heads x 2 rotary dims, instead of 2 x 3 x 8
    assert kv["tensors"][0]["shape"] == ["pages", "4", "18"] and kv["layers"][0]["mla_rank"] == 12
    from kiln.artifact import kv_summary

    assert kv_summary(kv)["bytes_per_token"] == 2 * 18 * 4
    # the full-sequence and the cached program agree (interpreter), and so does the compiled one
    full, _ = kiln.run_pipeline(llama, "convert-mla{rank=12,rope_dims=2}")
    T = IDS.shape[1]
    cached = interp.run(
        g,
        {
            "input_ids": IDS,
            "positions": torch.arange(T, dtype=torch.int32)[None],
            "page_table": torch.tensor([[3, 0, 1]], dtype=torch.int32),
            **{t["name"]: torch.zeros(4, 4, 18) for t in kv["tensors"]},
        },
    )[0]
    assert rel_err(cached[0, -1], logits(full)[0, -1]) < 1e-5
    assert compiled_vs_interpreter(g, IDS[0].tolist(), steps=3) < 1e-5


def test_convert_gqa_compiled_equals_interpreter(llama) -> None:
    g, _ = kiln.run_pipeline(llama, "convert-gqa{kv_heads=1},kv-cache{page_size=8},canonicalize")
    assert g.meta["kv_cache"]["layers"][0]["kv_heads"] == 1
    assert compiled_vs_interpreter(g, IDS[0].tolist(), steps=2) < 1e-5


def test_kv_planner_numbers_and_report() -> None:
    from kiln.kvplan import bytes_per_token, plan
    from kiln.report import render_report

    smol = [{"kv_heads": 3, "head_dim": 64, "num_heads": 9, "window": 0}] * 30
    assert bytes_per_token(smol, "fp32") == 30 * 2 * 3 * 64 * 4 == 46080  # what kv-cache lays out
    assert bytes_per_token(smol, "int8") == 30 * (2 * 3 * 64 + 2 * 3 * 4)  # codes + fp32 scales (kv_summary)
    assert bytes_per_token(smol, "fp16", "mqa") == 30 * 2 * 64 * 2
    assert bytes_per_token(smol, "fp32", "mha") == 3 * 46080
    mla = [dict(smol[0], mla_rank=168, rope_dims=8)] * 30
    assert bytes_per_token(mla, "fp32") == 46080 // 2
    rows = {(r["variant"], r["dtype"]): r for r in plan(smol, 2**30, 16, contexts=(2048,))}
    assert set(v for v, _ in rows) == {"as built", "mha", "mqa"}
    r = rows[("as built", "fp32")]
    assert r["max_tokens"] == (2**30 // (46080 * 16)) * 16 and r["batch_at"][2048] == r["max_tokens"] // 2048
    with pytest.raises(ValueError, match="unknown KV dtype"):
        bytes_per_token(smol, "int4")
    m = {"target": {"name": "cpu"}, "kv_cache": {"page_size": 16, "layers": smol, "dtype": "float32"}}
    assert "## KV-cache plan" in render_report(m) and "| mqa | int8 | 4080 |" in render_report(m)


def test_memory_needs_count_weights_pages_and_the_targets_workspace() -> None:
    from kiln.kvplan import memory_needs
    from kiln.report import render_report

    layers = [{"kv_heads": 8, "head_dim": 128, "num_heads": 32, "window": 0}] * 32
    model = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "vocab_size": 128256}
    kv = {"page_size": 16, "layers": layers, "dtype": "float16", "bytes_per_token": 131072}
    m = {"target": {"name": "cpu"}, "model": model, "kv_cache": kv, "weight_bytes": 16 * 2**30, "max_context": 8192}
    need = memory_needs(m, batch=64, context=1000, chunk=512)
    assert need["weights"] == 16 * 2**30
    assert need["kv_cache"] == 64 * 1008 * 131072  # each sequence rounded up to whole 16-token pages
    assert need["logits"] == 64 * 128256 * 4
    fused = need["prefill_workspace"]
    assert fused == 512 * (4 * 4096 + 3 * 14336) * 4  # fused attention: activations only
    # a target whose prefill attention materializes the scores and gathers K/V pays for both
    m["target"] = {"name": "cuda", "prefill_scores_bytes": 10, "prefill_gathers_kv": True}
    cuda = memory_needs(m, batch=64, context=1000, chunk=512)
    assert cuda["prefill_workspace"] - fused == 32 * 512 * 1008 * 10 + 2 * 8 * 1008 * 128 * 2
    assert cuda["total"] == sum(v for k, v in cuda.items() if k != "total")
    text = render_report(m, batch=8, context=4096)
    assert "GPU memory for batch 8 x context 4096" in text and "| kv cache | 4.000 |" in text


def test_convert_mla_activation_aware_with_calibration(llama) -> None:
    # with calibration windows attached the SVD whitens by the inputs' X^T X: still exact at full
    # rank, and closer than the plain weight SVD at a truncated rank (on the calibration text itself)
    g = llama.copy()
    g.meta["calib_tokens"] = [[(7 * i + 3) % 97 for i in range(40)], [(11 * i + 5) % 97 for i in range(40)]]
    ids = torch.tensor(g.meta["calib_tokens"][:1])
    ref = interp.run(llama, {"input_ids": ids})[0]
    full, rec = kiln.run_pipeline(g, "convert-mla{rank=24,rope_dims=8}")
    assert rec[-1].rewrites["activation-aware"] == 2
    assert rel_err(interp.run(full, {"input_ids": ids})[0], ref) < 1e-4
    aware, _ = kiln.run_pipeline(g, "convert-mla{rank=8,rope_dims=8}")
    plain, _ = kiln.run_pipeline(llama, "convert-mla{rank=8,rope_dims=8}")
    assert rel_err(interp.run(aware, {"input_ids": ids})[0], ref) < rel_err(
        interp.run(plain, {"input_ids": ids})[0], ref
    )


def test_attention_option_inserts_the_conversion() -> None:
    from kiln.pass_options import build_pipeline

    assert build_pipeline("O1", attention="gqa:1").startswith(
        "canonicalize,fuse-norms,fuse-rope,fuse-attention,convert-gqa{kv_heads=1},fuse-mlp"
    )
    assert "convert-mla{rank=96,rope_dims=32},fuse-mlp" in build_pipeline("O1", attention="mla:96:32")
    assert "convert-gqa{kv_heads=1}" in build_pipeline("O1", attention="mqa")
    with pytest.raises(PassError, match="use gqa:N, mqa, mla:RANK"):
        build_pipeline("O1", attention="mla")
