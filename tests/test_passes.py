"""Each pass three ways: structure (it fired), negative (it must not fire), numbers (interpreter)."""

import os

import pytest
import torch
from conftest import FAMILIES, rel_err

from kiln import interp
from kiln.errors import PassError
from kiln.ir import Graph, ttype
from kiln.passes import REGISTRY, run_counted
from kiln.passmgr import run_pipeline
from kiln.pipeline import PIPELINES, parse_pipeline
from kiln.verify import verify


def run_pass(name, g, **params):
    out, counts = run_counted(REGISTRY[name], g, params)
    verify(out)
    return out, counts


def same_numbers(g1, g2, tokens=9):
    ids = torch.randint(0, 97, (2, tokens))
    a = interp.run(g1, {"input_ids": ids})[0]
    b = interp.run(g2, {"input_ids": ids})[0]
    assert rel_err(b, a) < 1e-5


def test_canonicalize_folds_noops_and_duplicates(traced):
    g, counts = run_pass("canonicalize", traced["llama"])
    assert counts["cse"] > 0 and counts["identity-arith"] > 0
    assert len(g.nodes) < len(traced["llama"].nodes)
    same_numbers(traced["llama"], g)


def test_canonicalize_turns_gpt2_matmuls_into_biased_linears(traced):
    g, counts = run_pass("canonicalize", traced["gpt2"])
    assert counts["matmul-weight"] == 8 and counts["linear-bias"] == 8
    assert not g.find("matmul")
    assert sum(len(n.inputs) == 3 for n in g.find("linear")) == 8
    same_numbers(traced["gpt2"], g)


def test_canonicalize_small_graph_rules():
    g = Graph()
    x = g.add_input("x", ttype([2, 3]))
    a = g.add("add", [x, g.const(0.0)])
    r1 = g.add("reshape", [a], {"shape": [6]})
    r2 = g.add("reshape", [r1], {"shape": [3, 2]})
    e1 = g.add("exp", [r2])
    e2 = g.add("exp", [r2])
    g.outputs = [g.add("add", [e1, e2])]
    out, counts = run_pass("canonicalize", g)
    assert counts == {"identity-arith": 1, "reshape-chain": 1, "cse": 1}
    assert [n.op for n in out.nodes if n.op not in ("input", "const")] == ["reshape", "exp", "add"]
    x0 = torch.randn(2, 3)
    torch.testing.assert_close(interp.run(out, {"x": x0})[0], interp.run(g, {"x": x0})[0])


@pytest.mark.parametrize("family,expected", [("llama", 5), ("qwen2", 5), ("mistral", 5), ("gpt2", 0)])
def test_fuse_norms(family, expected, traced):
    base, _ = run_pass("canonicalize", traced[family])
    g, counts = run_pass("fuse-norms", base)
    assert counts.get("rms-norm", 0) == expected == len(g.find("rms_norm"))
    if expected:
        assert not g.find("rsqrt")
    same_numbers(base, g)


@pytest.mark.parametrize("family,expected", [("gemma", 5), ("gemma3_text", 13)])
def test_fuse_norms_folds_gemma_one_plus_w(family, expected):
    """Gemma scales by (1 + w): the weight is folded into a new parameter and every norm fuses, qk-norms too."""
    from families import tiny_family

    from kiln.trace import trace

    base, _ = run_pass("canonicalize", trace(tiny_family(family), max_tokens=64))
    g, counts = run_pass("fuse-norms", base)
    assert counts["rms-norm"] == expected == len(g.find("rms_norm")) == counts["offset-weight-folded"]
    assert not g.find("rsqrt") and g.meta["norm_fallbacks"] == []
    w = g.find("rms_norm")[0].inputs[1]
    assert w.op == "param" and w.attrs["name"].endswith(".plus_1")
    torch.testing.assert_close(g.params[w.attrs["name"]], base.params[w.attrs["name"][: -len(".plus_1")]] + 1)
    same_numbers(base, g)


def test_fuse_norms_leaves_input_dependent_weight_and_says_why():
    g = Graph()
    x = g.add_input("x", ttype([2, 5, 8]))
    y = g.add_input("y", ttype([8]))
    ms = g.add("mean", [g.add("pow", [x, g.const(2.0)])], {"dims": [-1], "keepdim": True})
    h = g.add("mul", [x, g.add("rsqrt", [g.add("add", [ms, g.const(1e-6)])])])
    g.outputs = [g.add("mul", [h, g.add("add", [g.add_param("w", torch.randn(8)), y])])]
    out, counts = run_pass("fuse-norms", g)
    assert counts == {} and not out.find("rms_norm")
    [fb] = out.meta["norm_fallbacks"]
    assert fb["node"] == out.find("rsqrt")[0].name and "not a [dim] parameter" in fb["reason"]


@pytest.mark.parametrize("family,expected", [("llama", 4), ("mistral", 4), ("gpt2", 0)])
def test_fuse_rope(family, expected, traced):
    base, _ = run_pass("canonicalize", traced[family])
    g, counts = run_pass("fuse-rope", base)
    assert counts.get("rope", 0) == expected == len(g.find("rope"))
    if expected:
        assert not g.find("neg")
    same_numbers(base, g)


@pytest.mark.parametrize("family,window", [("llama", 0), ("mistral", 5), ("gpt2", 0)])
def test_fuse_attention(family, window, traced):
    base, _ = run_pass("canonicalize", traced[family])
    g, counts = run_pass("fuse-attention", base)
    atts = g.find("attention")
    assert counts["attention"] == 2 == len(atts) and not g.find("sdpa")
    assert all(a.attrs["window"] == window for a in atts)
    assert not g.find("aten"), "the mask construction must be dead after fusion"
    if family != "gpt2":
        assert counts["gqa-repeat-removed"] == 2
        assert all(int(a.inputs[1].type.shape[1]) == 3 for a in atts)  # the model's own 3 KV heads
    same_numbers(base, g, tokens=12)


class _Bidirectional(torch.nn.Module):
    """Attention with no mask at all: not causal, so fuse-attention must leave it alone."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.head = torch.nn.Linear(8, 11)

    def forward(self, input_ids, use_cache=False):
        h = self.emb(input_ids).unsqueeze(1)
        h = torch.nn.functional.scaled_dot_product_attention(h, h, h)
        return (self.head(h.squeeze(1)),)


def test_fuse_attention_does_not_fire_on_noncausal_and_kv_cache_explains():
    from kiln.trace import trace

    g = trace(_Bidirectional(), max_tokens=64)
    g2, counts = run_pass("fuse-attention", g)
    assert counts == {} and g2.find("sdpa")
    with pytest.raises(PassError, match="was not recognized as causal attention"):
        run_pass("kv-cache", g2)


@pytest.mark.parametrize("family,expected", [("llama", 2), ("qwen2", 2), ("gpt2", 0)])
def test_fuse_mlp(family, expected, traced):
    base, _ = run_pass("canonicalize", traced[family])
    g, counts = run_pass("fuse-mlp", base)
    assert counts.get("gated-mlp", 0) == expected == len(g.find("gated_mlp"))
    same_numbers(base, g)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_prefill_then_decode_equals_full_forward(family, traced, models):
    g, _ = run_pipeline(traced[family], "canonicalize,fuse-attention")
    inc, counts = run_pass("kv-cache", g, page_size=4)
    assert counts["cached-attention"] == 2 and counts["positions"] == 1
    assert [n.name for n in inc.inputs][:3] == ["input_ids", "positions", "page_table"]
    assert not inc.find("arange") and not inc.find("attention")
    kv = inc.meta["kv_cache"]
    caches = {f"kv_cache_{i}": torch.zeros(9, 2, l["kv_heads"], 4, l["head_dim"]) for i, l in enumerate(kv["layers"])}
    T = 11
    ids = torch.randint(0, 97, (1, T))
    with torch.no_grad():
        ref = models[family](input_ids=ids, use_cache=False).logits
    pt = torch.tensor([[7, 2, 5, 0]], dtype=torch.int32)  # shuffled, non-contiguous pages
    feed = dict(page_table=pt, **caches)
    out = interp.run(inc, dict(feed, input_ids=ids[:, :6], positions=torch.arange(6, dtype=torch.int32)[None]))[0]
    assert out.shape[1] == 1 and rel_err(out[0, -1], ref[0, 5]) < 1e-5
    for t in range(6, T):
        out = interp.run(
            inc, dict(feed, input_ids=ids[:, t : t + 1], positions=torch.tensor([[t]], dtype=torch.int32))
        )[0]
        assert rel_err(out[0, -1], ref[0, t]) < 1e-5


def test_kv_cache_requires_attention(traced):
    with pytest.raises(PassError, match="run fuse-attention first"):
        run_pass("kv-cache", traced["llama"])


def test_pipeline_parsing_and_errors():
    assert parse_pipeline("canonicalize,kv-cache{page_size=8,logits=all}") == [
        ("canonicalize", {}),
        ("kv-cache", {"page_size": 8, "logits": "all"}),
    ]
    assert [n for n, _ in parse_pipeline("O1")] == [n for n, _ in parse_pipeline(PIPELINES["O1"])]
    with pytest.raises(PassError, match="unknown pass 'fuse-everything'"):
        run_pipeline(Graph(), "canonicalize,fuse-everything")


def test_pass_manager_records_and_dumps(traced, tmp_path):
    g, records = run_pipeline(traced["llama"], "O1", dump_ir=str(tmp_path))
    names = [r.name for r in records]
    assert names == [n for n, _ in parse_pipeline("O1")]
    files = sorted(os.listdir(tmp_path))
    assert files[0] == "00-trace.txt" and files[7] == "07-kv-cache.txt"
    assert "cached_attention" in (tmp_path / "07-kv-cache.txt").read_text()
    kv = records[6]
    assert kv.rewrites["cached-attention"] == 2 and kv.nodes_after > 0 and kv.flops_per_token_after > 0
    fused = records[1]
    assert fused.nodes_after < fused.nodes_before
