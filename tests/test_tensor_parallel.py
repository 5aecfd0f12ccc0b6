"""Tensor parallelism on the CPU: shard-tensor-parallel makes each rank's graph, and the ranks' graphs
run together in a simulated group (kiln.ranks.run_ranks) give the unsharded graph's logits."""

import pytest
import torch
from conftest import tiny_model

from kiln import interp
from kiln.errors import PassError
from kiln.ir import Graph, ttype
from kiln.passes import REGISTRY, run_counted
from kiln.passmgr import run_pipeline
from kiln.ranks import RankGroupError, run_ranks
from kiln.verify import verify

FULL = "canonicalize,fuse-norms,fuse-rope,fuse-attention"
CACHED = "canonicalize,fuse-norms,fuse-rope,fuse-attention,fuse-mlp,kv-cache{page_size=4},canonicalize"


def shard(g, ranks):
    """Every rank's graph (verified) and the last rank's rewrite counters."""
    out = []
    for r in range(ranks):
        s, counts = run_counted(REGISTRY["shard-tensor-parallel"], g, {"ranks": ranks, "rank": r})
        verify(s)
        out.append(s)
    return out, counts


def traced(family="llama", **cfg):
    from kiln.trace import trace

    return trace(tiny_model(family, **cfg), max_tokens=64)


@pytest.fixture(scope="module")
def llama():
    """4 query heads over 2 KV heads: N=2 splits the KV heads, N=4 replicates them."""
    return traced(num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def full(llama):
    return run_pipeline(llama, FULL)[0]


@pytest.fixture(scope="module")
def cached(llama):
    return run_pipeline(llama, CACHED)[0]


def run_cached(graphs, steps):
    """Prefill then decode through each rank's own paged cache (9 pages; the int8 cache's scales too);
    `steps` [(ids, positions)]; returns each step's outputs per rank."""
    caches = []
    for g in graphs:
        tensors = g.meta["kv_cache"]["tensors"]
        dtypes = {"float32": torch.float32, "int8": torch.int8}
        caches.append(
            {
                t["name"]: torch.zeros([9 if d == "pages" else int(d) for d in t["shape"]], dtype=dtypes[t["dtype"]])
                for t in tensors
            }
        )
    pt = torch.tensor([[7, 2, 5, 0]], dtype=torch.int32)  # shuffled pages
    outs = []
    for ids, pos in steps:
        feeds = [dict(c, input_ids=ids, positions=pos, page_table=pt) for c in caches]
        outs.append(run_ranks(graphs, feeds))
    return outs


def steps_for(ids):
    T = ids.shape[1]
    out = [(ids[:, :6], torch.arange(6, dtype=torch.int32)[None])]
    out += [(ids[:, t : t + 1], torch.tensor([[t]], dtype=torch.int32)) for t in range(6, T)]
    return out


# -- numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [2, 4])
def test_full_sequence_ranks_equal_unsharded(full, ranks):
    graphs, counts = shard(full, ranks)
    ids = torch.randint(0, 97, (2, 9))
    ref = interp.run(full, {"input_ids": ids})[0]
    for out in run_ranks(graphs, {"input_ids": ids}):
        torch.testing.assert_close(out[0], ref)
    assert counts["column-parallel"] == 6 and counts["row-parallel"] == 2 and counts["mlp"] == 2


@pytest.mark.parametrize("ranks", [2, 4])
def test_prefill_and_decode_ranks_equal_unsharded(cached, ranks):
    graphs, counts = shard(cached, ranks)
    assert counts["gated-mlp"] == 2
    ids = torch.randint(0, 97, (1, 10))
    steps = steps_for(ids)
    ref = run_cached([cached], steps)
    got = run_cached(graphs, steps)
    for (r,), ranks_out in zip(ref, got):
        for out in ranks_out:
            torch.testing.assert_close(out[0], r[0])


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_biases_and_sliding_window(family):
    """Qwen2's q/k/v biases follow their rows; Mistral's sliding window is per head and stays."""
    g = run_pipeline(traced(family, num_attention_heads=4, num_key_value_heads=2), FULL)[0]
    graphs, _ = shard(g, 2)
    ids = torch.randint(0, 97, (1, 11))
    ref = interp.run(g, {"input_ids": ids})[0]
    for out in run_ranks(graphs, {"input_ids": ids}):
        torch.testing.assert_close(out[0], ref)


@pytest.mark.parametrize("ranks", [2, 3])
def test_gpt2_fused_qkv_and_tied_embedding(ranks):
    """GPT-2: one c_attn projection sliced into q/k/v, biases everywhere, an unfused GeLU MLP, the token
    table tied to the LM head; the learned position table is replicated."""
    g = traced("gpt2")
    full = run_pipeline(g, FULL)[0]
    graphs, counts = shard(full, ranks)
    assert counts["fused-qkv"] == 2 and counts["mlp"] == 2
    ids = torch.randint(0, 97, (2, 9))
    ref = interp.run(full, {"input_ids": ids})[0]
    for out in run_ranks(graphs, {"input_ids": ids}):
        torch.testing.assert_close(out[0], ref)
    w = graphs[0].meta["tensor_parallel"]["weights"]
    [qkv] = [v for k, v in w.items() if k.startswith("transformer.h.0.attn.c_attn.weight")]
    assert qkv["ranges"] == [[0, 48 // ranks], [48, 48 + 48 // ranks], [96, 96 + 48 // ranks]]  # q, k, v of rank 0
    assert w["transformer.wpe.weight"]["split"] == "replicated"
    cached = run_pipeline(g, CACHED)[0]
    graphs, _ = shard(cached, ranks)
    steps = steps_for(torch.randint(0, 97, (1, 8)))
    for (r,), outs in zip(run_cached([cached], steps), run_cached(graphs, steps)):
        for out in outs:
            torch.testing.assert_close(out[0], r[0])


@pytest.mark.parametrize(
    "family,rule",
    [
        ("phi", "mlp"),  # partial rotary: slices and a cat along head_dim stay per head
        ("stablelm", "gated-mlp"),  # partial rotary, gated MLP
        ("phi3", "fused-gate-up"),  # one qkv projection and one gate/up projection, each sliced in parts
        ("opt", "mlp"),  # queries scaled by a constant before the attention
    ],
)
def test_more_families(family, rule):
    from families import tiny_family

    from kiln.trace import trace

    g = run_pipeline(trace(tiny_family(family), max_tokens=64), CACHED)[0]
    graphs, counts = shard(g, 2)
    assert counts[rule] == 2 and len(graphs[0].find("all_reduce")) == 5
    steps = steps_for(torch.randint(0, 97, (1, 8)))
    for (r,), outs in zip(run_cached([g], steps), run_cached(graphs, steps)):
        for out in outs:
            torch.testing.assert_close(out[0], r[0])


def test_qk_norm_over_all_heads_is_refused():
    """OLMo-2 normalizes q and k over every head at once: a rank cannot, so the pass says so."""
    from families import tiny_family

    from kiln.trace import trace

    g = run_pipeline(trace(tiny_family("olmo2"), max_tokens=64), FULL)[0]
    with pytest.raises(PassError, match="over all heads together"):
        shard(g, 2)


# -- structure ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [2, 4])
def test_each_rank_holds_its_part_and_the_collectives(cached, ranks):
    graphs, _ = shard(cached, ranks)
    layers = len(cached.find("cached_attention"))
    for r, g in enumerate(graphs):
        tp = g.meta["tensor_parallel"]
        assert tp["ranks"] == ranks and tp["rank"] == r
        assert len(g.find("all_reduce")) == 2 * layers + 1  # attention and MLP per layer, the embedding
        assert len(g.find("all_gather")) == 1
        split = {k: v for k, v in tp["weights"].items() if v["split"] != "replicated"}
        replicated = {k for k, v in tp["weights"].items() if v["split"] == "replicated"}
        assert all(g.params[k].shape == cached.params[k].shape for k in replicated)
        assert all(cached.params[k].dim() == 1 for k in replicated if "rotary" not in k)  # norms only
        assert {v["role"].split(" %")[0] for v in split.values()} == {
            "the queries projection",
            "the keys projection",
            "the values projection",
            "the output projection",
            "the gate projection of",
            "the up projection of",
            "the down projection of",
            "the embedding table",
            "the LM head",
        }
        for k, v in split.items():
            whole, part, axis = cached.params[k], g.params[k], v["axis"]
            # 1/N of the split axis (the vocabulary padded to a multiple of N); with fewer KV heads than
            # ranks a rank holds the one KV head (of 2) its query heads read
            one_kv_head = ranks > 2 and v["role"].startswith(("the keys", "the values"))
            want = whole.shape[axis] // 2 if one_kv_head else -(-whole.shape[axis] // ranks)
            assert part.shape[axis] == want and part.shape[1 - axis] == whole.shape[1 - axis], k
        # each rank's cache holds its KV heads
        kv = g.meta["kv_cache"]
        want = max(1, 2 // ranks)
        assert all(lay["kv_heads"] == want and lay["num_heads"] == 4 // ranks for lay in kv["layers"])
        assert all(n.type.shape[2] == want for n in g.inputs if n.name.startswith("kv_cache_"))


def test_vocabulary_padding_is_recorded_and_dropped(full):
    graphs, _ = shard(full, 2)  # 97 ids: 49 rows each, the last one padding on rank 1
    w0, w1 = (g.meta["tensor_parallel"]["weights"]["lm_head.weight"] for g in graphs)
    assert w0["ranges"] == [[0, 49]] and w0["pad"] == 0
    assert w1["ranges"] == [[49, 97]] and w1["pad"] == 1
    assert graphs[1].params["lm_head.weight"][-1].abs().sum() == 0
    assert graphs[0].outputs[0].type.shape[-1] == 97


def test_fewer_kv_heads_than_ranks_replicates_them(full):
    graphs, counts = shard(full, 4)
    assert counts["kv-heads-replicated"] == 2
    k = "model.layers.0.self_attn.k_proj.weight"
    D = 12
    for r, g in enumerate(graphs):
        kv_head = r // 2  # query heads 0, 1 read KV head 0; 2, 3 read KV head 1
        assert g.meta["tensor_parallel"]["layers"][0] == {"heads": [r], "kv_heads": [kv_head]}
        torch.testing.assert_close(g.params[k], full.params[k][kv_head * D : (kv_head + 1) * D])


def test_multi_query_attention_replicates_its_one_kv_head():
    g = run_pipeline(traced(num_attention_heads=4, num_key_value_heads=1), FULL)[0]
    graphs, counts = shard(g, 4)
    assert counts["kv-heads-replicated"] == 2
    ids = torch.randint(0, 97, (1, 7))
    ref = interp.run(g, {"input_ids": ids})[0]
    for out in run_ranks(graphs, {"input_ids": ids}):
        torch.testing.assert_close(out[0], ref)


def test_pipeline_text_and_counters(llama):
    g, records = run_pipeline(llama, CACHED + ",shard-tensor-parallel{ranks=2,rank=1}")
    assert g.meta["tensor_parallel"]["rank"] == 1
    assert records[-1].name == "shard-tensor-parallel"


# -- negative cases ----------------------------------------------------------------------------


def test_heads_that_ranks_do_not_divide_are_refused(full):
    with pytest.raises(PassError, match=r"4 query heads, which 3 ranks do not divide; choose ranks among 1, 2, 4"):
        shard(full, 3)


def test_query_heads_straddling_kv_groups_are_refused():
    g = run_pipeline(traced(num_attention_heads=6, num_key_value_heads=3), FULL)[0]
    with pytest.raises(PassError, match="several KV groups"):
        shard(g, 2)
    graphs, counts = shard(g, 3)  # one KV head per rank
    assert not counts.get("kv-heads-replicated")


@pytest.mark.parametrize("pipeline", [FULL, CACHED])
def test_mlp_channels_that_ranks_do_not_divide_are_refused(pipeline):
    g = run_pipeline(traced(num_attention_heads=4, num_key_value_heads=2, intermediate_size=70), pipeline)[0]
    with pytest.raises(PassError, match="70 intermediate channels, which 4 ranks do not divide"):
        shard(g, 4)


def test_one_rank_leaves_the_graph_unchanged(full):
    g, counts = run_counted(REGISTRY["shard-tensor-parallel"], full, {"ranks": 1, "rank": 0})
    assert counts == {} and str(g) == str(full) and not g.find("all_reduce")
    assert all(g.params[k] is full.params[k] for k in full.params)


def test_needs_recognized_attention_and_a_valid_rank(llama):
    with pytest.raises(PassError, match="run fuse-attention first"):
        run_counted(REGISTRY["shard-tensor-parallel"], llama, {"ranks": 2, "rank": 0})
    with pytest.raises(PassError, match="0 <= rank < ranks"):
        run_counted(REGISTRY["shard-tensor-parallel"], llama, {"ranks": 2, "rank": 2})


def test_collectives_outside_a_group():
    g = Graph()
    x = g.add_input("x", ttype([2, 3]))
    g.outputs = [g.add("all_gather", [g.add("all_reduce", [x], {"ranks": 1})], {"ranks": 1, "dim": -1})]
    v = torch.randn(2, 3)
    torch.testing.assert_close(interp.run(g, {"x": v})[0], v)  # a group of one is the identity
    g2 = Graph()
    y = g2.add_input("x", ttype([2, 3]))
    g2.outputs = [g2.add("all_gather", [y], {"ranks": 2, "dim": 0})]
    assert g2.outputs[0].type == ttype([4, 3])
    with pytest.raises(Exception, match="run_ranks"):
        interp.run(g2, {"x": v})
    outs = run_ranks([g2, g2], [{"x": v}, {"x": v + 1}])
    torch.testing.assert_close(outs[1][0], torch.cat([v, v + 1]))


def test_ranks_that_disagree_fail_with_the_rank_named():
    a, b = Graph(), Graph()
    xa, xb = a.add_input("x", ttype([3])), b.add_input("x", ttype([3]))
    a.outputs = [a.add("all_reduce", [xa], {"ranks": 2})]
    b.outputs = [b.add("all_gather", [xb], {"ranks": 2, "dim": 0})]
    with pytest.raises(RankGroupError, match="different collectives"):
        run_ranks([a, b], {"x": torch.zeros(3)})


# -- quantization --------------------------------------------------------------------------------


def test_shard_after_int8_equals_the_quantized_graph(llama):
    """Quantized weights split on codes, scales and zeros: the ranks compute the quantized model."""
    q = run_pipeline(llama, "quantize-weights{scheme=int8}," + CACHED)[0]
    graphs, counts = shard(q, 2)
    assert counts["qweight-split"] > 0
    ids = torch.randint(0, 97, (1, 8))
    steps = steps_for(ids)
    for (r,), outs in zip(run_cached([q], steps), run_cached(graphs, steps)):
        for out in outs:
            torch.testing.assert_close(out[0], r[0])


def test_int8_kv_cache_keeps_its_scales_per_rank(llama):
    """An int8 cache's scales are per token and KV head: a rank's scales are its heads' own."""
    q = run_pipeline(llama, CACHED.replace("fuse-mlp,", "fuse-mlp,quantize-kv{dtype=int8},"))[0]
    graphs, _ = shard(q, 2)
    assert all(n.type.shape[2] == 1 for g in graphs for n in g.inputs if n.name.startswith("kv_cache_"))
    steps = steps_for(torch.randint(0, 97, (1, 8)))
    for (r,), outs in zip(run_cached([q], steps), run_cached(graphs, steps)):
        for out in outs:
            torch.testing.assert_close(out[0], r[0])


def test_grouped_quantization_splits_on_whole_groups(llama):
    ok = run_pipeline(llama, "quantize-weights{scheme=int4_g12}," + FULL)[0]
    graphs, _ = shard(ok, 2)
    ids = torch.randint(0, 97, (1, 7))
    ref = interp.run(ok, {"input_ids": ids})[0]
    for out in run_ranks(graphs, {"input_ids": ids}):
        torch.testing.assert_close(out[0], ref)
    cut = run_pipeline(llama, "quantize-weights{scheme=int4_g32}," + FULL)[0]
    with pytest.raises(PassError, match="cut a group; quantize with a group size that divides 24"):
        shard(cut, 2)


def test_shard_before_int8_matches_the_quantized_graph(full):
    """Each rank quantizes its own slices (per-channel scales of its columns): close, not equal."""
    q = run_counted(REGISTRY["quantize-weights"], full, {"scheme": "int8"})[0]
    graphs = [run_counted(REGISTRY["quantize-weights"], g, {"scheme": "int8"})[0] for g in shard(full, 2)[0]]
    ids = torch.randint(0, 97, (2, 9))
    ref, base = interp.run(q, {"input_ids": ids})[0], interp.run(full, {"input_ids": ids})[0]
    for out in run_ranks(graphs, {"input_ids": ids}):
        sqnr = 10 * torch.log10(base.pow(2).mean() / (out[0] - base).pow(2).mean())
        ref_sqnr = 10 * torch.log10(base.pow(2).mean() / (ref - base).pow(2).mean())
        assert sqnr > ref_sqnr - 3  # as close to fp32 as the single-rank int8 graph, within 3 dB
        assert (out[0] - ref).abs().max() < 0.1 * ref.abs().max()


def test_compile_refuses_tensor_parallel_where_no_runtime_serves_it():
    """The mlir and pim targets have no rank group: kiln.compile says so before tracing."""
    import kiln
    from kiln.errors import KilnError

    m = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(KilnError, match=r"target 'pim' cannot build tensor_parallel=2: .*cpu and cuda"):
        kiln.compile(m, target="pim", tensor_parallel=2)
    with pytest.raises(KilnError, match="number of ranks >= 1"):
        kiln.compile(m, target="cpu", tensor_parallel=0)
    with pytest.raises(KilnError, match="--draft and --tensor-parallel together are not built yet"):
        kiln.compile(m, target="cpu", tensor_parallel=2, draft="self:1")
