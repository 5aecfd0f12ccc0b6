"""Sampling and text under the server: SamplingParams checks, penalties against a numpy reference,
incremental detokenization with stop-string hold-back, and the prompt forms generate accepts.

The model is conftest's tiny Llama with SmolLM2's real tokenizer (`smol_artifact`)."""

import math

import numpy as np
import pytest

import kiln
from kiln.runtime.sampling import SamplingError, SamplingParams, apply_penalties, probs


@pytest.fixture(scope="module")
def engine(smol_artifact):
    return kiln.load(smol_artifact, kv_cache_tokens=2048)


# -- SamplingParams -----------------------------------------------------------------------------------
BAD = [
    ("max_tokens", 0),
    ("max_tokens", True),  # a bool is not a count
    ("max_tokens", 3.0),
    ("temperature", float("nan")),  # nan < 0 is False: a plain range check would pass it
    ("temperature", -0.5),
    ("temperature", float("inf")),
    ("temperature", "0.7"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", float("nan")),
    ("top_k", 1.5),  # float top_k refused, not truncated
    ("top_k", -2),
    ("top_k", False),
    ("min_p", 1.1),
    ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5),
    ("frequency_penalty", float("-inf")),
    ("n", 0),
    ("seed", 1.5),
    ("logprobs", 21),
    ("logprobs", -1),
    ("stop", ("",)),
    ("stop_token_ids", (-1,)),
    ("ignore_eos", 1),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_sampling_params_refuse_bad_values_naming_the_field(field, value):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{field: value}).validate()
    assert e.value.param == field and field in str(e.value)


def test_sampling_params_accept_vllm_forms():
    for k in (-1, 0, 5):
        SamplingParams(top_k=k).validate()
    p = SamplingParams(stop="###", stop_token_ids=[7], temperature=1, n=3, seed=4, logprobs=0)
    p.validate()
    assert p.stop == ("###",) and p.stop_token_ids == (7,)
    with pytest.raises(SamplingError, match="not both"):
        SamplingParams(json_schema={"type": "object"}, json_object=True).validate()
    # -1 and 0 both disable top_k: the distributions are the same
    z = np.random.default_rng(0).normal(size=50)
    assert np.allclose(probs(z, SamplingParams(temperature=1, top_k=-1)), probs(z, SamplingParams(temperature=1)))


def _penalty_reference(logits, prompt, output, rep, pres, freq):
    out = logits.astype(np.float64).copy()
    for t in set(prompt) | set(output):  # repetition: over prompt and output (vLLM)
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= freq * output.count(t) + pres
    return out


def test_penalties_match_a_numpy_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=37).astype(np.float32)
    prompt, output = [1, 2, 2, 30], [2, 5, 5, 5, 36, 1]
    for rep, pres, freq in [(1.3, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.7), (0.8, -0.4, 1.1)]:
        p = SamplingParams(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
        got = apply_penalties(logits, p, prompt, output)
        assert np.allclose(got, _penalty_reference(logits, prompt, output, rep, pres, freq))
    # greedy follows the penalized logits: a strong presence penalty moves argmax off a used token
    top = int(np.argmax(logits))
    p = SamplingParams(presence_penalty=2.0, frequency_penalty=2.0)
    assert int(np.argmax(probs(logits, p, [], [top] * 3))) != top


def test_penalties_steer_generation_as_a_reference_loop_does(engine):
    """generate with penalties == prefill/decode by hand, taking the argmax of the numpy-penalized logits."""
    rep, pres, freq = 1.5, 0.5, 0.7
    p = SamplingParams(max_tokens=10, repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq,
                       ignore_eos=True)  # fmt: skip
    prompt = engine.tokenizer.encode("Hello hello hello")
    got = engine.generate(prompt, p)[0].token_ids
    pages = engine.pool.alloc(engine.pool.pages_for(len(prompt) + 10))
    try:
        logits, out = engine.prefill(prompt, pages), []
        for _ in range(10):
            out.append(int(np.argmax(_penalty_reference(logits, prompt, out, rep, pres, freq))))
            logits = engine.decode([out[-1]], [len(prompt) + len(out) - 1], [pages])[0]
    finally:
        engine.pool.release(pages)
    assert got == out
    assert got != engine.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids


def test_min_p_and_top_k_filter_the_distribution():
    z = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    pr = probs(z, SamplingParams(temperature=1.0, min_p=0.2))  # keeps p >= 0.1
    assert pr[3] == 0 and pr[2] > 0 and math.isclose(pr.sum(), 1.0)
    pr = probs(z, SamplingParams(temperature=1.0, top_k=2))
    assert (pr > 0).sum() == 2 and np.allclose(pr[:2], [0.5 / 0.8, 0.3 / 0.8])


# -- detokenization and stop strings ------------------------------------------------------------------
def test_incremental_detokenization_and_stop_string_hold_back(engine):
    from kiln.runtime.detokenize import Detokenizer

    tok = engine.tokenizer
    text = "Grüße aus Köln 日本語 🙂 and then END of story"
    ids = tok.encode(text)
    d = Detokenizer(tok, [1, 2], stop=())
    assert "".join(d.add(t) for t in ids) + d.flush() == tok.decode(ids)  # multi-byte characters intact
    d = Detokenizer(tok, [1], stop=("END", "never-seen"))
    shown = ""
    for t in ids:
        shown += d.add(t)
        assert "E" not in shown.split("then")[-1]  # "E" could start END: held back until decided
        assert d.text.startswith(shown)
        if d.stopped:
            break
    shown += d.flush()
    assert d.stopped == "END" and shown == d.text == text[: text.index("END")]


# -- generate's input forms ---------------------------------------------------------------------------
def test_generate_accepts_every_prompt_form(engine):
    sp = SamplingParams(max_tokens=3)
    one = engine.generate("Hi there", sp)
    assert len(one) == 1 and one[0].prompt_ids == engine.tokenizer.encode("Hi there")  # not one per character
    assert len(engine.generate(["Hi there", "Bye"], sp)) == 2
    ids = engine.tokenizer.encode("Hi there")
    assert engine.generate(ids, sp)[0].token_ids == one[0].token_ids
    assert len(engine.generate([ids, ids[:1]], sp)) == 2
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = engine.generate(chat, sp)
    assert len(out) == 1 and out[0].prompt_ids == engine.tokenizer.encode(engine.tokenizer.apply_chat_template(chat))
    assert "Be brief." in engine.tokenizer.tok.decode(out[0].prompt_ids, skip_special_tokens=False)
    assert len(engine.generate([chat, chat[1:]], sp)) == 2
    outs = engine.generate("Hi", SamplingParams(max_tokens=4, n=3, temperature=1.0, seed=7))
    assert [o.index for o in outs] == [0, 1, 2] and len({tuple(o.token_ids) for o in outs}) > 1
    again = engine.generate("Hi", SamplingParams(max_tokens=4, n=3, temperature=1.0, seed=7))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]  # seeds seed, seed+1, ...: reproducible
    for bad, err in [([1.5, 2.0], TypeError), ([[1, 2], 3], TypeError), ([[]], ValueError), ([99999999], ValueError)]:
        with pytest.raises(err):
            engine.generate(bad, sp)
    with pytest.raises(ValueError, match="role"):
        engine.generate([{"role": "wizard", "content": "hi"}], sp)


def test_stop_tokens_and_stop_strings_are_not_in_the_text(engine):
    base = engine.generate("Tell me", SamplingParams(max_tokens=16, ignore_eos=True))[0]
    stop_tok = base.token_ids[5]
    out = engine.generate("Tell me", SamplingParams(max_tokens=16, stop_token_ids=[stop_tok], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: base.token_ids.index(stop_tok) + 1]
    assert out.text == engine.tokenizer.decode(out.token_ids[:-1])
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    out = engine.generate("Tell me", SamplingParams(max_tokens=16, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == base.text[: base.text.index(stop)]


def test_chat_rendering_matches_transformers(engine, smol_artifact):
    """System prompt and several turns render exactly as transformers renders the same template."""
    import os

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(os.path.join(smol_artifact, "tokenizer"))
    chat = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Ça va ?"},
    ]
    for msgs in (chat, chat[1:2]):
        want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert engine.tokenizer.apply_chat_template(msgs) == want
        assert engine.encode(msgs) == hf(want, add_special_tokens=False)["input_ids"]
