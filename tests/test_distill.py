"""kiln.distill on tiny models: the loss falls, a damaged student moves toward its teacher, frozen and
refused cases."""

import pytest
import torch

import kiln
from kiln.errors import KilnError
from kiln.passmgr import run_pipeline

FULL = "canonicalize,fuse-norms,fuse-rope,fuse-attention,fuse-mlp"


@pytest.fixture(scope="module")
def teacher(traced):
    g, _ = run_pipeline(traced["llama"], FULL)
    return g


def _text(n=600, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # a learnable stream: a repeating random phrase with noise, so the teacher has structure to copy
    base = torch.randint(0, 97, (23,), generator=gen)
    ids = base.repeat(n // 23 + 1)[:n].clone()
    flip = torch.rand(n, generator=gen) < 0.1
    ids[flip] = torch.randint(0, 97, (int(flip.sum()),), generator=gen)
    return ids.tolist()


def _damaged(g):
    s = g.copy()
    gen = torch.Generator().manual_seed(1)
    for name, t in s.params.items():
        if t.dim() == 2 and "mlp" in name:
            s.params[name] = t + 2.0 * t.std() * torch.randn(t.shape, generator=gen)
    return s


def test_distill_reduces_loss_and_moves_student_to_teacher(teacher):
    student = _damaged(teacher)
    text = _text()
    evals = [text[:64], text[64:128]]
    before = {k: v.clone() for k, v in student.params.items()}
    r = kiln.distill(teacher, student, text, steps=25, seq_len=24, batch=4, lr=1e-3, eval_tokens=evals)
    assert isinstance(r, kiln.DistillResult) and r.steps == 25 and len(r.history) == 25
    assert r.loss_after < 0.5 * r.loss_before, (r.loss_before, r.loss_after)
    # the student's perplexity moves toward the teacher's
    assert abs(r.ppl_after - r.teacher_ppl) < 0.5 * abs(r.ppl_before - r.teacher_ppl)
    # a new graph: the student passed in is unchanged
    assert all(torch.equal(before[k], student.params[k]) for k in before)
    assert not torch.equal(
        r.student.params["model.layers.0.mlp.up_proj.weight"], student.params["model.layers.0.mlp.up_proj.weight"]
    )
    # rotary frequencies are buffers, not weights: never trained
    assert torch.equal(r.student.params["model.rotary_emb.inv_freq"], teacher.params["model.rotary_emb.inv_freq"])
    assert r.student.meta["distill"][-1]["steps"] == 25


def test_distill_from_module_teacher_with_hidden_matching(models, teacher):
    student = _damaged(teacher)
    r = kiln.distill(
        models["llama"],
        student,
        torch.tensor(_text()),
        steps=10,
        seq_len=16,
        batch=2,
        lr=3e-3,
        hidden_weight=1.0,
        seed=3,
    )
    assert r.loss_after < r.loss_before


def test_distill_is_seeded(teacher):
    student = _damaged(teacher)
    a = kiln.distill(teacher, student, _text(), steps=3, seq_len=16, batch=2, lr=1e-3)
    b = kiln.distill(teacher, student, _text(), steps=3, seq_len=16, batch=2, lr=1e-3)
    assert a.history == b.history


def test_distill_keeps_quantized_weights_frozen(teacher):
    from kiln.passes import REGISTRY, run_counted

    q, _ = run_counted(REGISTRY["quantize-weights"], teacher, {"scheme": "int8"})
    r = kiln.distill(teacher, q, _text(), steps=2, seq_len=16, batch=2, lr=1e-3)
    assert r.frozen_quantized > 0
    for name, t in q.params.items():
        if ".int8." in name:
            assert torch.equal(r.student.params[name], t)


def test_distill_refuses_bad_input(teacher):
    with pytest.raises(KilnError, match="fewer than seq_len"):
        kiln.distill(teacher, teacher, [1, 2, 3], steps=1, seq_len=16)
    with pytest.raises(KilnError, match="names no tokenizer"):
        kiln.distill(teacher, teacher, "some text", steps=1)
    cached, _ = run_pipeline(teacher, "kv-cache")
    with pytest.raises(KilnError, match="before the kv-cache pass"):
        kiln.distill(teacher, cached, _text(), steps=1)
