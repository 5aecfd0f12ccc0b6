"""Pruning and sparsity passes on tiny models: structure, numbers (compiled CPU vs interpreter on the
pruned weights), identity at 0%, refused requests, compact sparse storage."""

import numpy as np
import pytest
import torch
from conftest import rel_err

import kiln
from kiln import interp
from kiln.errors import PassError
from kiln.pass_options import build_pipeline
from kiln.passmgr import run_pipeline
from kiln.verify import verify

BASE = "canonicalize,fuse-norms,fuse-rope,fuse-attention"


@pytest.fixture(scope="module")
def base(traced):
    out = {}
    for fam in ("llama", "gpt2"):
        g, _ = run_pipeline(traced[fam], BASE)
        gen = torch.Generator().manual_seed(0)
        g.meta["calib_tokens"] = [torch.randint(0, 97, (24,), generator=gen).tolist() for _ in range(2)]
        out[fam] = g
    return out


def logits(g, ids):
    return interp.run(g, {"input_ids": ids})[0]


@pytest.mark.parametrize(
    "spec,heads,kv",
    [
        ("prune-heads{ratio=0.5,unit=query,criterion=magnitude}", [3, 3], [3, 3]),  # one query head of each group
        ("prune-heads{ratio=0.5,unit=group,scope=layer,criterion=wanda}", [2, 2], [1, 1]),  # whole KV groups
        ("prune-heads{ratio=0.5/0.0,unit=query,criterion=taylor}", [3, 6], [3, 3]),  # per-layer ratios
    ],
)
def test_prune_heads_keeps_gqa_consistent(base, spec, heads, kv):
    g, recs = run_pipeline(base["llama"], spec)
    verify(g)
    atts = g.find("attention")
    assert [int(a.inputs[0].type.shape[1]) for a in atts] == heads
    assert [int(a.inputs[1].type.shape[1]) for a in atts] == kv
    assert recs[-1].extra["heads"] == heads and recs[-1].extra["params_after"] < recs[-1].extra["params_before"]
    assert g.params["model.layers.0.self_attn.o_proj.weight"].shape[1] == heads[0] * 8
    logits(g, torch.randint(0, 97, (2, 7)))


def test_prune_ffn_and_layers_shapes(base):
    g, recs = run_pipeline(base["llama"], "prune-ffn{ratio=0.4,multiple=8},prune-layers{n=1}")
    verify(g)
    assert recs[0].extra["ffn"] == [40, 40] and recs[0].rewrites["ffn-channels-removed"] == 64
    assert len(g.find("attention")) == 1 and recs[1].extra["layers_after"] == 1
    assert g.meta["prune"]["ffn"] == [40]
    assert recs[1].param_bytes_after < recs[1].param_bytes_before
    assert recs[1].flops_per_token_after < recs[1].flops_per_token_before
    # GPT-2's MLP (biases, reshapes, GeLU written out) is found by the same channel analysis
    g2, r2 = run_pipeline(base["gpt2"], "prune-ffn{ratio=0.5,criterion=magnitude}")
    assert r2[0].extra["ffn"] == [96, 96] and g2.params["transformer.h.0.mlp.c_fc.bias"].shape == (96,)
    logits(g2, torch.randint(0, 97, (1, 5)))


def test_pruning_zero_is_identity(base):
    ids = torch.randint(0, 97, (2, 9))
    ref = logits(base["llama"], ids)
    for spec in ("prune-heads{ratio=0}", "prune-ffn{ratio=0.0}", "prune-layers{n=0}", "sparsify{ratio=0}"):
        g, _ = run_pipeline(base["llama"], spec)
        assert g.stats()["params"] == base["llama"].stats()["params"]
        torch.testing.assert_close(logits(g, ids), ref, rtol=0, atol=0)


def test_impossible_requests_are_refused(base):
    g = base["llama"]
    with pytest.raises(PassError, match=r"ratio 1.0 is outside \[0, 1\).*prune-layers"):
        run_pipeline(g, "prune-heads{ratio=1.0}")
    with pytest.raises(PassError, match=r"outside \[0, 1\)"):
        run_pipeline(g, "prune-ffn{ratio=-0.1}")
    with pytest.raises(PassError, match="remove every one of the model's 2 layers; use 0 <= n <= 1"):
        run_pipeline(g, "prune-layers{n=2}")
    with pytest.raises(PassError, match="layer 5 does not exist"):
        run_pipeline(g, "prune-layers{layers=5}")
    with pytest.raises(PassError, match="3 per-layer ratios for 2 layers"):
        run_pipeline(g, "prune-heads{ratio=0.1/0.2/0.3}")
    with pytest.raises(PassError, match="unit must be auto, group or query"):
        run_pipeline(g, "prune-heads{ratio=0.5,unit=head}")
    nocalib = g.copy()
    nocalib.meta.pop("calib_tokens")
    with pytest.raises(PassError, match="calibration text.*criterion=magnitude"):
        run_pipeline(nocalib, "prune-ffn{ratio=0.2,criterion=wanda}")
    fused, _ = run_pipeline(g, "fuse-mlp")
    with pytest.raises(PassError, match="before fuse-mlp"):
        run_pipeline(fused, "prune-ffn{ratio=0.2}")
    with pytest.raises(PassError, match="N:M like 2:4"):
        run_pipeline(g, "sparsify{pattern=half}")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsify_patterns(base, method, pattern):
    g, recs = run_pipeline(base["llama"], f"sparsify{{ratio=0.5,pattern={pattern},method={method}}}")
    w = g.params["model.layers.1.mlp.down_proj.weight"]
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.02
    if pattern == "2:4":
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    assert not (g.params["lm_head.weight"] == 0).any()  # the output layer is left alone by default
    assert recs[0].extra["density"] == pytest.approx(0.5, abs=0.02)


def test_sparse_storage_round_trip():
    from kiln.runtime.sparse import compress, expand

    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 20, 32)).astype(np.float32)
    grp = a.reshape(3, 5, 4, 32)
    np.put_along_axis(grp, np.argsort(np.abs(grp), axis=2)[:, :, :2], 0, axis=2)
    a[1, :4, 3] = 0  # a group with fewer than two nonzeros
    arrays, rec = compress(a, "2:4")
    assert rec["format"] == "nm" and sum(x.nbytes for x in arrays.values()) < 0.6 * a.nbytes
    assert np.array_equal(expand({"w" + k: v for k, v in arrays.items()}, "w", rec), a)
    b = np.where(rng.random(a.shape) < 0.5, 0, a).astype(np.float32)
    arrays, rec = compress(b, "unstructured")
    assert rec["format"] == "bitmask" and np.array_equal(expand({"w" + k: v for k, v in arrays.items()}, "w", rec), b)
    assert compress(rng.standard_normal((4, 4)).astype(np.float32), "unstructured") is None  # dense: stored as is


def test_pruned_model_compiles_and_matches_interpreter(models, traced, tmp_path):
    """Non-uniform heads, FFN sizes and a removed layer, 2:4 weights: the CPU artifact (paged KV cache)
    gives the interpreter's logits on the pruned graph."""
    prune = "prune-heads{ratio=0.5/0.0,criterion=magnitude},prune-ffn{ratio=0.3/0.6,criterion=magnitude,multiple=4}"
    art = kiln.compile(
        models["llama"], target="cpu", passes="O1", prune=prune, sparsify="2:4", sparsify_method="magnitude"
    )
    path = art.save(str(tmp_path / "pruned"))
    ref_graph, _ = run_pipeline(
        traced["llama"], build_pipeline(BASE, prune=prune, sparsify="2:4", sparsify_method="magnitude")
    )
    assert [int(a.inputs[0].type.shape[1]) for a in ref_graph.find("attention")] == [3, 6]
    assert any(w["transform"].startswith("s24") for w in art.manifest["weights"])  # 2:4 layout, run compressed
    eng = kiln.load(path, kv_cache_tokens=256)
    ids = torch.randint(0, 97, (1, 13), generator=torch.Generator().manual_seed(2))
    ref = logits(ref_graph, ids)[0]
    pages = eng.pool.alloc(eng.pool.pages_for(16))
    got = eng.prefill(ids[0].tolist(), pages)
    assert rel_err(got, ref[-1]) < 1e-4
    nxt = int(np.argmax(got))
    ref2 = logits(ref_graph, torch.cat([ids, torch.tensor([[nxt]])], 1))[0, -1]
    got2 = eng.decode([nxt], [13], [pages])[0]
    assert rel_err(got2, ref2) < 1e-4


def test_distill_brings_pruned_student_closer(base):
    from kiln.passmgr import run_pipeline as rp

    teacher = base["llama"]
    student, _ = rp(
        teacher, "prune-heads{ratio=0.5,criterion=magnitude},prune-ffn{ratio=0.6,criterion=magnitude,multiple=4}"
    )
    gen = torch.Generator().manual_seed(5)
    text = torch.randint(0, 97, (23,), generator=gen).repeat(30)
    ev = [text[:60].tolist(), text[60:120].tolist()]
    r = kiln.distill(teacher, student, text, steps=20, seq_len=24, batch=4, lr=3e-4, eval_tokens=ev)
    assert r.loss_after < 0.5 * r.loss_before
    assert abs(r.ppl_after - r.teacher_ppl) < abs(r.ppl_before - r.teacher_ppl)
