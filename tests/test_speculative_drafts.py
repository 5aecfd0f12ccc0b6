"""Draft models built into the artifact (`--draft self:N`, `--draft distill:N`) and the per-step choice
between them and prompt lookup (`draft="auto"`): outputs stay the target's, weights are shared."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from chisq import chi2, critical
from conftest import tiny_model

from kiln.runtime.sampling import SamplingParams, probs
from kiln.runtime.serving import Server
from kiln.runtime.speculative import _S, Speculator


@pytest.fixture(scope="module")
def drafted(tmp_path_factory):
    """A 4-layer tiny Llama with tied embeddings (as SmolLM2) with a self draft (2 layers, shared weights,
    whole vocabulary) and a distilled draft (2 layers, 3 training steps, an output layer over 40 of the 97
    tokens, so its embedding is a plain table the target holds only in the packed output-layer layout)."""
    import kiln

    m = tiny_model("llama", num_hidden_layers=4, tie_word_embeddings=True)
    out = str(tmp_path_factory.mktemp("drafted") / "a")
    return kiln.compile(m, target="cpu", passes="O1", draft=["self:2", "distill:2:3:40"]).save(out)


@pytest.fixture(scope="module")
def target(drafted):
    import kiln

    return kiln.load(drafted, kv_cache_tokens=2048)


def _prompts(n: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 97, size=int(rng.integers(5, 14))).tolist() for _ in range(n)]


def _run(eng, prompts, params, draft=None):
    with Server(eng, max_batch=3, background=False, prefix_caching=False, draft=draft) as srv:
        outs = [o.token_ids for o in srv.generate(prompts, params)]
        return outs, srv.metrics()


@pytest.mark.parametrize("draft", ["self", "distill", "auto", "auto:self"])
def test_greedy_output_is_the_targets_with_each_draft_kind(target, draft):
    prompts, params = _prompts(5), SamplingParams(max_tokens=30)
    ref, _ = _run(target, prompts, params)
    got, m = _run(target, prompts, params, draft)
    assert got == ref
    assert m["spec_proposed"] > 0, m  # the draft did propose: the comparison tested speculation
    if draft.startswith("auto"):
        assert m["spec_ngram_steps"] + m["spec_model_steps"] + m["spec_plain_steps"] > 0


def test_self_draft_shares_the_targets_weights(drafted, target):
    from kiln.runtime.draft_model import load_draft

    man = json.load(open(os.path.join(drafted, "manifest.json")))
    info = man["drafts"]
    assert info["self"]["own_weights"] == 0 and info["self"]["shared_weights"] > 0
    assert info["distill"]["own_weights"] > 0  # trained layers and the reduced output layer are its own
    assert info["distill"]["head_tokens"] == 40
    dman = json.load(open(os.path.join(drafted, "drafts/distill/manifest.json")))
    assert list(dman["derived_weights"]) == ["model.embed_tokens.weight"]  # not stored again
    files = man["files"]
    target_bytes = sum(f["bytes"] for rel, f in files.items() if not rel.startswith("drafts/"))
    self_bytes = sum(f["bytes"] for rel, f in files.items() if rel.startswith("drafts/self/"))
    weights = files["weights.safetensors"]["bytes"]
    assert self_bytes == info["self"]["bytes"]  # what the draft adds, as the manifest reports it
    assert target_bytes + self_bytes < 2 * target_bytes  # smaller than two full models
    assert os.path.getsize(os.path.join(drafted, "drafts/self/weights.safetensors")) < weights / 50
    d = load_draft(target, "self")
    names = [w["name"] for w in target.manifest["weights"]]
    shared = set(d.manifest["shared_weights"])
    # the draft holds the target's arrays, not copies: writing one through the target shows in the draft
    w_t = dict(zip(names, target.weights))
    w_d = dict(zip([w["name"] for w in d.manifest["weights"]], d.weights))
    name = sorted(shared)[0]
    assert w_d[name].numpy().tobytes() == w_t[name].numpy().tobytes()
    assert load_draft(target, "self") is d  # loaded once per target


def test_sampling_with_a_reduced_vocabulary_draft_keeps_the_target_distribution(target):
    """4000 draws of the first token a speculative step emits with the distilled draft, whose output layer
    scores 40 of the 97 tokens (q is zero elsewhere), against the target's softmax (chi-square, p < 1e-4);
    the draft's own distribution must fail the same test."""
    from kiln.runtime.draft_model import load_draft

    draft = load_draft(target, "distill")
    sp = SamplingParams(max_tokens=8, temperature=1.5)
    prompt = [5, 17, 33, 2, 91, 40, 8]
    L, B, R, k = len(prompt), 100, 40, 3
    spec = Speculator(target, draft, k=k, adaptive=False)
    seqs = [
        _S(list(prompt), target.pool.alloc(1), sp, np.random.default_rng(2000 + i), draft.pool.alloc(1), 0)
        for i in range(B)
    ]
    try:
        p = probs(target.prefill(prompt, seqs[0].pages), sp)
        q = np.zeros_like(p)
        q[draft.vocab_map] = probs(draft.prefill(prompt, seqs[0].dpages), sp)
        for s in seqs:
            target.prefill(prompt[:-1], s.pages)
        counts = np.zeros(p.shape[0])
        for _ in range(R):
            for s, new in zip(seqs, spec.step(seqs, k)):
                counts[new[0]] += 1
                s.ids, s.dcomputed = list(prompt), min(s.dcomputed, L - 1)
    finally:
        for s in seqs:
            target.pool.release(s.pages)
            draft.pool.release(s.dpages)
    assert counts.sum() == B * R
    assert counts[np.setdiff1d(np.arange(97), draft.vocab_map)].sum() > 0  # tokens the draft cannot propose
    stat, df = chi2(counts, p)
    assert stat < critical(df), (stat, df)
    stat_q, df_q = chi2(counts, q)
    assert stat_q > critical(df_q), "the draft's distribution is too close to the target's for this test"


def test_auto_weighs_the_draft_cost():
    from kiln.runtime.spec_policy import StepCosts, best_k

    costs = StepCosts(1.0, tuple(1.0 + 0.05 * k for k in range(9)))
    assert best_k([0.9], [8], costs, 8, draft_cost=0.1)[0] >= 3  # a cheap, good draft: long drafts
    assert best_k([0.3], [8], costs, 8, draft_cost=0.4)[0] == 0  # a costly, poor one: plain decoding
    assert best_k([0.1], [8], costs, 8, draft_cost=0.0)[0] == 0  # prompt lookup that rarely agrees
    assert best_k([0.3], [8], costs, 8, draft_cost=0.0)[0] == 2  # ... and one that agrees now and then


def test_missing_or_bad_drafts_are_refused_clearly(target):
    import kiln
    from kiln.draft import parse_draft
    from kiln.errors import KilnError
    from kiln.runtime.draft_model import load_draft

    plain = load_draft(target, "self")  # an engine whose artifact carries no drafts of its own
    with pytest.raises(ValueError, match="no self draft.*--draft self:8"):
        Server(plain, background=False, draft="self")
    with pytest.raises(ValueError, match="unknown draft 'fast'"):
        Server(target, background=False, draft="fast")
    for bad in ("self", "big:4", "self:x", "self:0", "distill:2:-1"):
        with pytest.raises(KilnError, match="--draft"):
            parse_draft(bad)
    assert parse_draft("distill:4:200:full").head == 0
    with pytest.raises(KilnError, match="has 2 layers"):
        kiln.compile(tiny_model("llama"), target="cpu", passes="O1", draft="self:2")


def test_kiln_build_refuses_a_bad_draft_before_loading(tmp_path, capsys):
    from kiln.cli import main

    assert main(["build", "no-such-model", "-o", str(tmp_path / "a"), "--draft", "self"]) == 1
    err = capsys.readouterr().err
    assert "--draft 'self'" in err and "self:LAYERS" in err


@pytest.mark.slow
def test_smollm2_self_draft_is_small_and_keeps_greedy_output(tmp_path):
    """The real model with `--draft self:8` (build cache: built once): the draft adds under a tenth of the
    target's bytes (its embedding comes from the target's output layer), and greedy chat output through the
    self draft and through `auto` is the target's own."""
    import kiln
    from kiln.api import cached_build
    from kiln.models import builtin_gguf

    try:
        builtin_gguf("smollm2-135m")
    except Exception as e:
        pytest.skip(str(e))
    path, _ = cached_build("smollm2-135m", str(tmp_path / "a"), draft=["self:8"])
    man = json.load(open(os.path.join(path, "manifest.json")))
    target_bytes = sum(f["bytes"] for rel, f in man["files"].items() if not rel.startswith("drafts/"))
    assert man["drafts"]["self"]["bytes"] < 0.1 * target_bytes, man["drafts"]["self"]
    eng = kiln.load(path, kv_cache_tokens=2048)
    prompts = [eng.encode(q, chat=True) for q in ("Why is the sky blue?", "Give me two tips for sleeping better.")]
    sp = SamplingParams(max_tokens=24)
    ref, _ = _run(eng, prompts, sp)
    for draft in ("self", "auto"):
        got, m = _run(eng, prompts, sp, draft)
        assert got == ref, draft
        assert m["spec_proposed"] > 0 or m.get("spec_plain_steps", 0) > 0
