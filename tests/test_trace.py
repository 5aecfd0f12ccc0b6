"""Tracing: four model families, one table of aten conversions, no per-architecture code."""

import pytest
import torch
from conftest import FAMILIES, rel_err

from kiln import interp
from kiln.errors import UnsupportedOpError
from kiln.trace import trace
from kiln.verify import verify


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_matches_transformers(family, models, traced):
    g = traced[family]
    verify(g)
    assert [str(d) for d in g.inputs[0].type.shape] == ["batch", "tokens"]
    ids = torch.randint(0, 97, (3, 13))
    out = interp.run(g, {"input_ids": ids})[0]
    with torch.no_grad():
        ref = models[family](input_ids=ids, use_cache=False).logits
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5


def test_source_lines_are_recorded(traced):
    g = traced["llama"]
    srcs = [n.source for n in g.nodes if n.op == "linear"]
    assert all(s and "modeling_llama.py:" in s for s in srcs)


class _Sorts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, input_ids, use_cache=False):
        h = self.emb(input_ids)
        return (torch.sort(h, dim=-1).values,)  # kiln has no conversion for aten.sort


def test_unsupported_op_names_op_and_source_line():
    with pytest.raises(UnsupportedOpError) as e:
        trace(_Sorts())
    msg = str(e.value)
    assert "aten.sort" in msg
    assert "test_trace.py:" in msg and "torch.sort(h" in msg
    assert "compiler/trace.py" in msg  # says what to do
