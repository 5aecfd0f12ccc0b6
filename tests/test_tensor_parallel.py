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


# -- the rank group at run time: one process per rank (runtime/rank_group.py) --------------------------


@pytest.fixture(scope="module")
def tp_artifacts(tmp_path_factory):
    """The same tiny model built for the cpu target on one rank and on two."""
    import kiln

    m = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    out = {}
    for ranks in (1, 2):
        out[ranks] = kiln.compile(m, target="cpu", tensor_parallel=ranks).save(
            str(tmp_path_factory.mktemp(f"tp{ranks}"))
        )
    return out


def test_tensor_parallel_int8_build_matches_one_rank(tmp_path):
    """Quantization composes: an int8 build over two ranks (each keeps its rows' scales) gives the int8 build's
    logits on one rank."""
    import numpy as np

    import kiln
    from kiln.runtime.engine import Engine

    m = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    paths = [kiln.compile(m, quant="int8", tensor_parallel=n).save(str(tmp_path / f"q{n}")) for n in (1, 2)]
    with Engine(paths[0], kv_cache_tokens=128) as e1, Engine(paths[1], kv_cache_tokens=128) as e2:
        a, b = e1.prefill([3, 1, 4, 1, 5, 9, 2, 6], [0, 1]), e2.prefill([3, 1, 4, 1, 5, 9, 2, 6], [0, 1])
        assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())


def test_tensor_parallel_artifact_layout(tp_artifacts):
    """Rank 0 at the top, rank 1 a whole artifact under ranks/1 with half the attention heads; the top
    manifest lists the members and checksums every rank's files."""
    import json
    import os

    top = json.load(open(os.path.join(tp_artifacts[2], "manifest.json")))
    one = json.load(open(os.path.join(tp_artifacts[2], "ranks", "1", "manifest.json")))
    assert top["tensor_parallel"]["members"] == ["", "ranks/1"]
    assert (top["tensor_parallel"]["rank"], one["tensor_parallel"]["rank"]) == (0, 1)
    assert one["pipeline"].endswith("shard-tensor-parallel{ranks=2,rank=1}")
    assert "ranks/1/weights.safetensors" in top["files"]
    assert [lay["heads"] for lay in one["tensor_parallel"]["layers"]] == [[2, 3], [2, 3]]
    from kiln.report import render_report

    assert (
        "- tensor parallel: rank 0 of 2; weights and KV cache above are this rank's share (the other ranks: ranks/1)"
        in (render_report(top))
    )


def test_tensor_parallel_engine_matches_one_rank(tp_artifacts):
    """Two CPU processes exchanging through shared memory give the single-rank build's logits (fp32 sums in
    another order) and the same greedy tokens, through the engine and the continuous-batching server."""
    import numpy as np

    from kiln.runtime.engine import Engine
    from kiln.runtime.sampling import SamplingParams
    from kiln.runtime.serving import Server

    with Engine(tp_artifacts[1], kv_cache_tokens=256) as e1, Engine(tp_artifacts[2], kv_cache_tokens=256) as e2:
        assert e2.group is not None and _rank_workers() == [e2.group.procs[0].pid]
        ids = [1, 5, 9, 20, 33, 2, 7, 11, 60]
        a, b = e1.prefill(ids, [0, 1, 2]), e2.prefill(ids, [0, 1, 2])
        assert np.abs(a - b).max() < 1e-5 * max(1.0, np.abs(a).max())
        a, b = e1.decode([3, 4], [9, 0], [[0, 1, 2], [3]]), e2.decode([3, 4], [9, 0], [[0, 1, 2], [3]])
        assert np.abs(a - b).max() < 1e-5 * max(1.0, np.abs(a).max())
        prompts = [[1, 2, 3, 4], [9, 8, 7], [5] * 11]
        p = SamplingParams(max_tokens=12, ignore_eos=True)
        want = [c.token_ids for c in e1.generate(prompts, p)]
        assert [c.token_ids for c in e2.generate(prompts, p)] == want
        with Server(e2, policy="continuous", max_batch=2) as srv:
            got = [h.result().token_ids for h in [srv.submit(x, p) for x in prompts]]
        assert got == want
    assert not _rank_workers()  # closing the engine stopped its worker


def test_tensor_parallel_rank_death_fails_calls_with_reason(tp_artifacts):
    """A rank killed while rank 0 waits for it in a collective: the call fails (no hang) naming the rank and
    how it stopped, and so does every later call; closing still works."""
    import os
    import signal
    import threading
    import time

    from kiln.runtime.engine import Engine
    from kiln.runtime.rank_group import RankError

    eng = Engine(tp_artifacts[2], kv_cache_tokens=256)
    pid = eng.group.procs[0].pid
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(RankError, match=rf"rank 1 \(pid {pid}\) stopped with exit code -9"):
        while time.monotonic() - t0 < 60:
            eng.decode([3], [0], [[0]])
    assert time.monotonic() - t0 < 30
    with pytest.raises(RankError, match="restart the server or engine"):
        eng.prefill([1, 2], [0])
    eng.close()
    assert not _rank_workers()


def test_tensor_parallel_rank_death_stops_the_server(tp_artifacts):
    """Under the server, a dead rank fails the requests in flight with the reason, and the server refuses
    new ones saying why (its scheduler stops: the engine cannot run anything any more)."""
    import os
    import signal

    from kiln.runtime.engine import Engine
    from kiln.runtime.sampling import SamplingParams
    from kiln.runtime.serving import Server

    with Engine(tp_artifacts[2], kv_cache_tokens=256) as eng, Server(eng, policy="continuous", max_batch=2) as srv:
        p = SamplingParams(max_tokens=4, ignore_eos=True)
        assert len(srv.submit([1, 2, 3], p).result().token_ids) == 4
        os.kill(eng.group.procs[0].pid, signal.SIGKILL)
        eng.group._watchdog.join(30)  # the watchdog has seen the exit
        with pytest.raises(Exception, match="rank 1 .* stopped with exit code -9"):
            srv.submit([4, 5, 6], p).result()
        srv._thread.join(30)
        with pytest.raises(RuntimeError, match="scheduler stopped .*RankError"):
            srv.submit([7, 8], p)


def test_tensor_parallel_damaged_rank_is_refused_without_hanging(tp_artifacts, tmp_path):
    """A flipped byte in rank 1's weights: the engine refuses to load, naming the file, and leaves no worker."""
    import shutil
    import time

    from kiln.runtime.engine import Engine
    from kiln.runtime.errors import ArtifactError, RankError

    bad = str(tmp_path / "bad")
    shutil.copytree(tp_artifacts[2], bad)
    w = tmp_path / "bad" / "ranks" / "1" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    t0 = time.monotonic()
    with pytest.raises((ArtifactError, RankError), match="ranks/1/weights.safetensors|weights.safetensors"):
        Engine(bad, kv_cache_tokens=64)
    assert time.monotonic() - t0 < 60
    assert not _rank_workers()


def _rank_workers() -> list[int]:
    """Worker processes of this process's rank groups still alive."""
    import os

    out = []
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"kiln.runtime.rank_group" in cmd:
            out.append(int(pid))
    return out


def test_tensor_parallel_refuses_a_member_and_a_weights_dict(tp_artifacts):
    """Rank 1's directory alone is refused (rank 0 starts the group), as is one dict of weights for all ranks."""
    import os

    from kiln.runtime.engine import Engine
    from kiln.runtime.errors import ArtifactError

    with pytest.raises(ArtifactError, match="rank 1 of a 2-rank tensor-parallel artifact: open the artifact's top"):
        Engine(os.path.join(tp_artifacts[2], "ranks", "1"))
    with pytest.raises(ArtifactError, match="weights=FUNCTION"):
        Engine(tp_artifacts[2], weights={})


# -- on 2 GPUs: NCCL between two processes, each rank on its own GPU ------------------------------------


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


def build_cuda_pair(out: str) -> dict[int, str]:
    """tests/cuda_models.py's tiny Llama (8 query heads over 1 KV head: each rank keeps a copy of it) built for
    the cuda target on one rank and on two, with its weights."""
    import os

    paths = {}
    for ranks in (1, 2):
        paths[ranks] = os.path.join(out, f"tiny-tp{ranks}")
        if not os.path.exists(os.path.join(paths[ranks], "manifest.json")):
            from cuda_models import make_model

            import kiln

            kiln.compile(make_model("tiny-llama"), target="cuda", tensor_parallel=ranks).save(paths[ranks])
    return paths


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs")
def test_tensor_parallel_on_two_gpus_matches_one(tmp_path):
    """The 2-rank cuda build (NCCL inside the decode step's CUDA graph) gives the 1-rank build's logits within
    fp16 rounding and the same greedy tokens, through the engine and the server. Artifacts: KILN_CUDA_TP_ARTIFACTS
    (built elsewhere by build_cuda_pair), or built here."""
    import os

    import numpy as np

    from kiln.runtime.engine import Engine
    from kiln.runtime.sampling import SamplingParams
    from kiln.runtime.serving import Server

    paths = build_cuda_pair(os.environ.get("KILN_CUDA_TP_ARTIFACTS") or str(tmp_path))
    with Engine(paths[1], kv_cache_tokens=512) as e1, Engine(paths[2], kv_cache_tokens=512) as e2:
        ids = [1, 5, 9, 20, 33, 2, 7, 11, 60]
        a, b = e1.prefill(ids, [0, 1, 2]), e2.prefill(ids, [0, 1, 2])
        assert np.abs(a - b).max() < 2e-2 * max(1.0, np.abs(a).max())
        prompts = [[1, 2, 3, 4], [9, 8, 7], [5] * 11]
        p = SamplingParams(max_tokens=16, ignore_eos=True)
        want = [c.token_ids for c in e1.generate(prompts, p)]
        assert [c.token_ids for c in e2.generate(prompts, p)] == want
        with Server(e2, policy="continuous", max_batch=4) as srv:
            assert [h.result().token_ids for h in [srv.submit(x, p) for x in prompts]] == want


def _peer_sum_rank(r, q_in, q_out, res):
    """One process of test_peer_memory_all_reduce_two_processes (spawned)."""
    import ctypes

    from kiln.runtime.p2p_allreduce import library

    torch.cuda.set_device(0)
    lib = library("sm_90a")
    h = ctypes.create_string_buffer(64)
    assert lib.kiln_ar_alloc(0, r, 2, ctypes.cast(h, ctypes.c_void_p)) == 0
    q_out.put((r, h.raw))
    hs = q_in.get()
    assert lib.kiln_ar_open(ctypes.cast(ctypes.create_string_buffer(hs, 128), ctypes.c_void_p)) == 0
    ok = True
    s = torch.cuda.current_stream().cuda_stream
    for n in (1, 4096, 5000, 262144):  # one block, a few, a ragged last block, the 1 MB cap
        x = torch.arange(n, device="cuda", dtype=torch.float32) * (r + 1)
        out = torch.empty_like(x)
        for _ in range(3):
            assert lib.kiln_ar_run(x.data_ptr(), out.data_ptr(), n, ctypes.c_void_p(s)) == 0
            torch.cuda.synchronize()
            ok = ok and torch.equal(out, torch.arange(n, device="cuda", dtype=torch.float32) * 3)
    n, st = 4096, torch.cuda.Stream()
    x, out, g = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda"), torch.cuda.CUDAGraph()
    with torch.cuda.stream(st), torch.cuda.graph(g, stream=st):
        for _ in range(4):  # 4 sums a replay: the epochs advance on the device
            lib.kiln_ar_run(x.data_ptr(), out.data_ptr(), n, ctypes.c_void_p(st.cuda_stream))
    for k in range(3):
        x.fill_(float(k + r))
        g.replay()
        torch.cuda.synchronize()
        ok = ok and bool((out == float(2 * k + 1)).all())
    res.put((r, ok))
    if r == 0:  # rank 1 is gone: this sum waits for it until aborted
        import threading

        threading.Timer(1.0, lib.kiln_ar_abort).start()
        lib.kiln_ar_run(x.data_ptr(), out.data_ptr(), n, ctypes.c_void_p(s))
        torch.cuda.synchronize()
        res.put(("aborted", True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peer_memory_all_reduce_two_processes():
    """The peer-memory all-reduce between two processes on GPU 0 (time-sliced, so correctness only): exact sums
    at 1 to 262,144 floats, replayed in a CUDA graph with new inputs, and a sum whose peer is gone returns once
    aborted instead of hanging."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    qs, back, res = [ctx.Queue() for _ in range(2)], ctx.Queue(), ctx.Queue()
    ps = [ctx.Process(target=_peer_sum_rank, args=(r, qs[r], back, res)) for r in range(2)]
    for p in ps:
        p.start()
    hs = dict(back.get(timeout=300) for _ in range(2))
    for q in qs:
        q.put(hs[0] + hs[1])
    got = dict(res.get(timeout=120) for _ in range(3))
    for p in ps:
        p.join(60)
    assert got == {0: True, 1: True, "aborted": True}
    assert [p.exitcode for p in ps] == [0, 0]


def test_tensor_parallel_artifact_runs_from_a_bundle(tp_artifacts, tmp_path):
    """A bundle carries every rank, and its isolated interpreter (python -I -S, lib/ first) starts the workers
    with its own packages: the bundled 2-rank artifact gives the 1-rank build's logits."""
    import json
    import subprocess
    import sys

    import numpy as np

    from kiln.bundle import make_bundle
    from kiln.runtime.engine import Engine

    b = make_bundle(tp_artifacts[2], str(tmp_path / "b")).path
    code = (
        f"import sys, json; sys.path.insert(0, {str(tmp_path / 'b' / 'lib')!r}); import os; "
        "os.environ['TVM_USE_RUNTIME_LIB'] = '1'; from kiln.runtime.engine import Engine; "
        f"e = Engine({str(tmp_path / 'b' / 'artifact')!r}, kv_cache_tokens=64); "
        "print(json.dumps([e.decode([1, 2], [0, 0], [[0], [1]]).tolist(), e.group.procs[0].args[1:3]])); e.close()"
    )
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=300, cwd=b)
    assert r.returncode == 0, r.stderr
    got, flags = json.loads(r.stdout.strip().splitlines()[-1])
    assert flags == ["-I", "-S"]
    with Engine(tp_artifacts[1], kv_cache_tokens=64) as e1:
        want = e1.decode([1, 2], [0, 0], [[0], [1]])
    assert np.abs(np.array(got) - want).max() < 1e-5 * max(1.0, np.abs(want).max())
