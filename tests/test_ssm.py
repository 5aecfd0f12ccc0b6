"""State-space models: the captured ops, their cached forms, and the state kv-cache derives.

Structure (the mixers become `selective_scan` / `causal_conv1d`, then their cached forms with state
inputs), numbers (the ops against a plain recurrence; prefill in chunks then decode through the state
equals transformers' full forward), and the negative case (an attention model gets no state)."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from families import SSM_FAMILIES, tiny_family

from kiln import interp
from kiln.ops import OPS
from kiln.passmgr import run_pipeline
from kiln.trace import trace
from kiln.verify import verify


@functools.cache
def traced(family: str):
    m = tiny_family(family)
    return m, trace(m, max_tokens=64)


@functools.cache
def derived(family: str):
    g, _ = run_pipeline(traced(family)[1], "O1")
    verify(g)
    return g


def _naive_scan(x, dt, A, B, C, D, dt_bias, z):
    """Mamba's recurrence written per head, channel and token: the definition the op must meet."""
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    y = torch.zeros(Bsz, T, H, P)
    for b in range(Bsz):
        for h in range(H):
            g = h // (H // G)
            for p in range(P):
                s = torch.zeros(N)
                for t in range(T):
                    d = F.softplus(dt[b, t, h] + dt_bias[h])
                    a = A[h] if A.dim() == 2 else A[h].expand(N)
                    s = torch.exp(d * a) * s + d * B[b, t, g] * x[b, t, h, p]
                    y[b, t, h, p] = (s * C[b, t, g]).sum() + D[h] * x[b, t, h, p]
    return y if z is None else y * F.silu(z)


@pytest.mark.parametrize("scalar_a,groups", [(False, 1), (True, 2)])
def test_selective_scan_reference_is_the_recurrence(scalar_a, groups):
    torch.manual_seed(0)
    Bsz, T, H, P, N = 2, 7, 4, 3 if scalar_a else 1, 5
    x, z = torch.randn(Bsz, T, H, P), torch.randn(Bsz, T, H, P)
    dt, dt_bias = torch.randn(Bsz, T, H), torch.randn(H) * 0.1
    A = -torch.rand(H) if scalar_a else -torch.rand(H, N)
    B, C, D = torch.randn(Bsz, T, groups, N), torch.randn(Bsz, T, groups, N), torch.randn(H)
    ours = OPS["selective_scan"].ref(
        None, [x, dt, A, B, C, D, dt_bias, z], {"softplus": True, "dt_min": 0.0, "dt_max": 0.0}
    )
    torch.testing.assert_close(ours, _naive_scan(x, dt, A, B, C, D, dt_bias, z), rtol=1e-5, atol=1e-5)


def test_cached_ops_continue_the_full_forms_across_chunks():
    """Prefill 5 tokens, then 3, then 1 (decode), in a shuffled slot: the same values as the full op."""
    torch.manual_seed(1)
    T, H, P, N, Ch, W = 9, 4, 2, 3, 6, 4
    x, dt, A = torch.randn(1, T, H, P), torch.randn(1, T, H), -torch.rand(H)
    B, C, D, bias = torch.randn(1, T, 2, N), torch.randn(1, T, 2, N), torch.randn(H), torch.randn(H)
    cx, cw, cb = torch.randn(1, T, Ch), torch.randn(Ch, W), torch.randn(Ch)
    attrs = {"softplus": True, "dt_min": 0.0, "dt_max": 0.0}
    full = OPS["selective_scan"].ref(None, [x, dt, A, B, C, D, bias], attrs)
    conv = OPS["causal_conv1d"].ref(None, [cx, cw, cb], {"act": "silu"})
    state, window = torch.randn(3, H, P, N), torch.randn(3, W - 1, Ch)  # stale values: position 0 resets them
    slots, pt = torch.tensor([0, 0, 0, 0, 2], dtype=torch.int32), torch.tensor([[4, 1]], dtype=torch.int32)
    for lo, hi in [(0, 5), (5, 8), (8, 9)]:
        pos = torch.arange(lo, hi, dtype=torch.int32)[None]
        s = slice(lo, hi)
        y = OPS["cached_selective_scan"].ref(
            None, [x[:, s], dt[:, s], A, B[:, s], C[:, s], state, slots, pt, pos, D, bias], attrs
        )
        torch.testing.assert_close(y, full[:, s], rtol=1e-5, atol=1e-5)
        yc = OPS["cached_causal_conv1d"].ref(None, [cx[:, s], cw, window, slots, pt, pos, cb], {"act": "silu"})
        torch.testing.assert_close(yc, conv[:, s], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(window[2], cx[0, -(W - 1) :])


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_mixers_are_captured_as_ops_and_the_rest_is_traced(family):
    m, g = traced(family)
    layers = m.config.num_hidden_layers
    assert len(g.find("selective_scan")) == layers and len(g.find("causal_conv1d")) == layers
    assert not g.find("aten")  # nothing passed through opaquely
    # projections stay ordinary linear layers (quantize-weights sees them): in_proj and out_proj at least
    assert len(g.find("linear")) >= 2 * layers + 1
    scan = g.find("selective_scan")[0]
    assert scan.attrs["softplus"] and scan.inputs[2].type.rank == (2 if family == "mamba" else 1)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_kv_cache_derives_a_state_slot_per_sequence(family):
    inc = derived(family)
    m = traced(family)[0]
    assert not inc.find("selective_scan") and not inc.find("causal_conv1d")
    assert len(inc.find("cached_selective_scan")) == m.config.num_hidden_layers
    names = [n.name for n in inc.inputs]
    assert names[:4] == ["input_ids", "positions", "page_table", "kv_cache_slots"]
    st = inc.meta["kv_cache"]["state"]
    assert not st["prefix_caching"] and not st["speculation"]
    assert st["bytes_per_sequence"] == sum(lay["bytes"] for lay in st["layers"]) > 0
    states = [n for n in inc.inputs if n.name.endswith(("_ssm", "_conv"))]
    assert len(states) == 2 * m.config.num_hidden_layers and all(str(n.type.shape[0]) == "slots" for n in states)


def _state_feed(inc, slots: int, pages: int) -> dict:
    """Every cache input of the program (a hybrid's paged KV caches too): `pages` pages, `slots` slots."""
    feed = {"kv_cache_slots": torch.zeros(pages, dtype=torch.int32)}
    size = {"pages": pages, "slots": slots}
    for n in inc.inputs:
        if n.name.startswith("kv_cache_") and n.name != "kv_cache_slots":
            shape = [size.get(str(d)) or int(d) for d in n.type.shape]
            feed[n.name] = torch.full(shape, 7.0)  # stale values: a state restarts at position 0
    return feed


@pytest.mark.parametrize("family", SSM_FAMILIES)
def test_prefill_in_chunks_then_batched_decode_equals_full_forward(family):
    m, _ = traced(family)
    inc = derived(family)
    T = 12
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=False).logits
    feed = _state_feed(inc, slots=4, pages=8)
    feed["kv_cache_slots"][[5, 2]] = torch.tensor([3, 1], dtype=torch.int32)  # sequence 0 starts at page 5, 1 at 2
    pts = [torch.tensor([[5, 0]], dtype=torch.int32), torch.tensor([[2, 6]], dtype=torch.int32)]

    def run(x, pos, pt):
        return interp.run(inc, dict(feed, input_ids=x, positions=pos.to(torch.int32), page_table=pt))[0]

    for b in range(2):  # each prompt prefilled alone, in two chunks
        for lo, hi in [(0, 5), (5, 8)]:
            out = run(ids[b : b + 1, lo:hi], torch.arange(lo, hi)[None], pts[b])
            assert rel_err(out[0, -1], ref[b, hi - 1]) < 1e-4
    pt = torch.cat(pts + [torch.zeros(1, 2, dtype=torch.int32)])  # a padding row (position -1)
    for t in range(8, T):  # both sequences decode together
        x = torch.cat([ids[:, t : t + 1], torch.zeros(1, 1, dtype=torch.long)])
        out = run(x, torch.tensor([[t], [t], [-1]]), pt)
        for b in range(2):
            assert rel_err(out[b, -1], ref[b, t]) < 1e-4, (family, t, b)


def test_attention_model_gets_no_state():
    m = tiny_family("llama")
    inc, _ = run_pipeline(trace(m, max_tokens=64), "O1")
    assert "state" not in inc.meta["kv_cache"]
    assert not any(n.name == "kv_cache_slots" or n.name.endswith(("_ssm", "_conv")) for n in inc.inputs)
    assert not any(n.op.startswith("cached_") and n.op != "cached_attention" for n in inc.nodes)


@pytest.fixture(scope="module")
def mamba_artifact(tmp_path_factory):
    import kiln

    m = tiny_family("mamba")
    art = kiln.compile(m, target="cpu", passes="O1", max_context=64).save(str(tmp_path_factory.mktemp("ssm") / "mamba"))
    return m, art


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 3, 77, 21, 9, 60, 14, 33, 50], [1, 2, 3], [90, 80, 70, 60, 50]]


def test_engine_reuses_state_slots_and_refuses_verify(mamba_artifact):
    """Two slots serve four sequences, two at a time (a finished sequence's slot is taken back); the
    manifest and report record the state; speculation's verify is refused with a reason."""
    import os

    from conftest import hf_greedy

    import kiln
    from kiln.runtime.artifact import read_manifest
    from kiln.runtime.sampling import SamplingParams

    m, art = mamba_artifact
    eng = kiln.load(art, kv_cache_tokens=256, state_slots=2)
    for pair in (PROMPTS[:2], PROMPTS[2:]):
        outs = eng.generate(pair, SamplingParams(max_tokens=6, ignore_eos=True))
        assert [o.token_ids for o in outs] == [hf_greedy(m, p, 6) for p in pair]
    with pytest.raises(Exception, match="state slots"):
        eng.generate(PROMPTS[:3], SamplingParams(max_tokens=2, ignore_eos=True))
    with pytest.raises(Exception, match="speculative"):
        eng.verify([[1, 2]], [[0, 1]], [[0]])
    kv = read_manifest(art)["kv_cache"]
    assert kv["layers"] == [] and kv["bytes_per_token"] == 0  # no attention: nothing grows with the context
    assert kv["state_bytes_per_sequence"] == kv["state"]["bytes_per_sequence"] > 0
    # what the engine allocates per slot is what the manifest says a sequence costs, at any context
    per_slot = sum(4 * int(np.prod(t.bind(0, 1))) for t in eng.kv_layout.tensors if "slots" in t.shape)
    assert per_slot == kv["state_bytes_per_sequence"]
    assert "## Recurrent state" in open(os.path.join(art, "report.md")).read()


def test_server_serves_state_models_without_prefix_caching(mamba_artifact):
    from conftest import hf_greedy

    import kiln
    from kiln.runtime.sampling import SamplingParams
    from kiln.runtime.serving import Server

    m, art = mamba_artifact
    eng = kiln.load(art, kv_cache_tokens=256, state_slots=4)
    srv = Server(eng, policy="continuous", max_batch=3, background=False)
    assert not srv.kv.prefix_caching
    outs = srv.generate(PROMPTS, SamplingParams(max_tokens=5, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(m, p, 5) for p in PROMPTS]


@pytest.mark.parametrize("N,groups,gate,scalar_a", [(16, 2, False, True), (5, 1, True, False)])
def test_cpu_kernels_match_the_cached_ops(N, groups, gate, scalar_a):
    """The CPU scan and conv kernels against the ops' reference: a 5-token prefill, then a batched decode with
    a padding row, sequences in shuffled slots (N=16: the 16-lane readout; N=5: one lane)."""
    tvm = pytest.importorskip("tvm")
    from kiln.targets.cpu.kernels import cpu_target
    from kiln.targets.cpu.ssm import causal_conv1d_func, selective_scan_func

    def build(f):
        return tvm.compile(tvm.IRModule({"main": f}), target=cpu_target())["main"]

    H, P, Ch, W = 4, 3, 6, 4
    attrs = {"softplus": True, "dt_min": 0.0, "dt_max": 0.0}
    scan = build(selective_scan_func(H, P, N, groups, True, 0.0, 0.0, gate))
    conv = build(causal_conv1d_func(Ch, W, True))
    torch.manual_seed(2)
    A = -torch.rand(H) if scalar_a else -torch.rand(H, N)
    A2 = A[:, None].expand(H, N).contiguous() if scalar_a else A
    D, bias, cw, cb = torch.randn(H), torch.randn(H) * 0.1, torch.randn(Ch, W), torch.randn(Ch)
    slots = torch.tensor([0, 2, 0, 1], dtype=torch.int32)
    st_ref, win_ref = torch.zeros(3, H, P, N), torch.zeros(3, W - 1, Ch)
    st_k, win_k = tvm.runtime.tensor(st_ref.numpy().copy()), tvm.runtime.tensor(win_ref.numpy().copy())

    def tv(a):
        return tvm.runtime.tensor(a.contiguous().numpy())

    for pt, pos in [
        (torch.tensor([[1, 0]]), torch.arange(5)[None]),  # prefill, sequence in slot 2
        (torch.tensor([[3, 0]]), torch.arange(5)[None]),  # prefill, sequence in slot 1
        (torch.tensor([[1, 0], [0, 0], [3, 0]]), torch.tensor([[5], [-1], [5]])),  # decode with a padding row
    ]:
        pt, pos = pt.to(torch.int32), pos.to(torch.int32)
        b, t = pos.shape
        x, dt, z = torch.randn(b, t, H, P), torch.randn(b, t, H), torch.randn(b, t, H, P)
        B, C = torch.randn(b, t, groups, N), torch.randn(b, t, groups, N)
        ins = [x, dt, A, B, C, st_ref, slots, pt, pos, D, bias] + ([z] if gate else [])
        want = OPS["cached_selective_scan"].ref(None, ins, attrs)
        out = tvm.runtime.tensor(np.zeros((b, t, H, P), "float32"))
        scan(st_k, tv(x), tv(dt), tv(A2), tv(B), tv(C), tv(slots), tv(pt), tv(pos), tv(D), tv(bias), tv(z), out)
        torch.testing.assert_close(torch.from_numpy(out.numpy()), want, rtol=1e-4, atol=1e-4)
        cx = torch.randn(b, t, Ch)
        want = OPS["cached_causal_conv1d"].ref(None, [cx, cw, win_ref, slots, pt, pos, cb], {"act": "silu"})
        out = tvm.runtime.tensor(np.zeros((b, t, Ch), "float32"))
        conv(win_k, tv(cx), tv(cw), tv(cb), tv(slots), tv(pt), tv(pos), out)
        torch.testing.assert_close(torch.from_numpy(out.numpy()), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(st_k.numpy()), st_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(win_k.numpy()), win_ref, rtol=1e-4, atol=1e-4)


def test_quantize_weights_reaches_the_projections_of_a_state_space_model():
    """The mixer's projections are ordinary linear layers of the trace: int8 weights quantize them and the
    model still prefills close to fp32 (lossy: a relative-error bound, not equality)."""
    from kiln.passes import REGISTRY, run_counted

    m, g = traced("mamba")
    base, _ = run_pipeline(g, "canonicalize")
    q, counts = run_counted(REGISTRY["quantize-weights"], base, {"scheme": "int8", "lm_head": "none"})
    layers = m.config.num_hidden_layers
    assert sum(v for k, v in counts.items() if "linear" in k or "quant" in k) >= 3 * layers, counts
    inc, _ = run_pipeline(q, "O1")
    assert len(inc.find("cached_selective_scan")) == layers
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=False).logits
    assert rel_err(interp.run(q, {"input_ids": ids})[0], ref) < 0.05
