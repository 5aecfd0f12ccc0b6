"""IR: printer, verifier, networkx view, reference interpreter."""

import pytest
import torch

from kiln import interp
from kiln.ir import Graph, ttype
from kiln.verify import VerifyError, verify


def small_graph():
    g = Graph("g")
    x = g.add_input("x", ttype(["batch", 5], "float32"))
    w = g.add_param("w", torch.randn(3, 5))
    y = g.add("linear", [x, w], name="y")
    z = g.add("silu", [y], name="z")
    g.outputs = [z]
    return g


def test_types_are_symbolic_and_printed():
    g = small_graph()
    text = str(g)
    assert "%y: float32[batch, 3] = linear(%x, %w)" in text
    assert "return %z" in text


def test_verifier_catches_wrong_type_and_order():
    g = small_graph()
    verify(g)
    g.nodes[-1].type = ttype(["batch", 4])
    with pytest.raises(VerifyError, match="typed float32\\[batch, 4\\]"):
        verify(g)
    g = small_graph()
    g.nodes[-1], g.nodes[-2] = g.nodes[-2], g.nodes[-1]
    with pytest.raises(VerifyError, match="before it is defined"):
        verify(g)


def test_shape_errors_name_the_problem():
    g = Graph()
    x = g.add_input("x", ttype([2, 5]))
    w = g.add_param("w", torch.randn(3, 4))
    with pytest.raises(ValueError, match="input features 5 != weight in-features 4"):
        g.add("linear", [x, w])


def test_nx_view_and_interpreter():
    g = small_graph()
    G = g.nx()
    assert G.has_edge("x", "y") and G.has_edge("y", "z") and G.nodes["y"]["op"] == "linear"
    x = torch.randn(7, 5)
    out = interp.run(g, {"x": x})[0]
    torch.testing.assert_close(out, torch.nn.functional.silu(x @ g.params["w"].T))
    with pytest.raises(ValueError, match="dim must be 5"):
        interp.run(g, {"x": torch.randn(7, 4)})


def test_op_records_check_attrs_and_name_inputs():
    from kiln.ops import AttrError, flops_of, ops_of_kind

    g = small_graph()
    x, y = g.inputs[0], g.find("linear")[0]
    assert y.input("bias") is None and y.input("w").op == "param"
    with pytest.raises(KeyError, match="no input named 'weight'"):
        y.input("weight")
    s = g.add("slice", [y], {"dim": 1, "start": 0, "end": 2})
    assert s.attrs["step"] == 1  # the default, filled in
    assert "slice(%y, dim=1, start=0, end=2)" in str(g)  # and not printed
    with pytest.raises(AttrError, match="op 'slice' has no attribute 'stride'"):
        g.add("slice", [y], {"dim": 1, "start": 0, "end": 2, "stride": 2})
    with pytest.raises(AttrError, match="op 'attention' needs attribute 'scale'"):
        g.add("attention", [x, x, x])
    with pytest.raises(ValueError, match="linear takes 2 to 3 inputs"):
        g.add("linear", [x])
    g.add("exp", [y], {"placement": "gpu"})  # annotations are allowed on any op
    assert {"reshape", "permute", "slice"} <= ops_of_kind("view") and "add" not in ops_of_kind("view")
    assert flops_of(y) == 2 * 3 * 5 * y.type.shape[0]


def test_verifier_catches_attrs_edited_in_place():
    g = small_graph()
    g.add("slice", [g.nodes[-1]], {"dim": 1, "start": 0, "end": 2})
    g.nodes[-1].attrs.pop("step")
    with pytest.raises(VerifyError, match="lacks attribute"):
        verify(g)
