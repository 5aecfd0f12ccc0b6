"""Pipelines by declaration: the compile options' pipelines (exact strings), placement by phase,
required passes, parameters checked against each pass's signature, and failures inside a pass."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import PassError
from kiln.ir import Graph
from kiln.pass_options import build_pipeline
from kiln.passes import PHASES, REGISTRY, register
from kiln.passmgr import PassManager, run_pipeline
from kiln.pipeline import check_pipeline, insert_passes, parse_pipeline

FRONT = "canonicalize,fuse-norms,fuse-rope,fuse-attention"
BACK = "fuse-mlp,fuse-moe,kv-cache,canonicalize"

# The strings kiln.compile's options produced when passes were spliced in by name: placing them by the
# passes' phases must give exactly these.
OPTION_PIPELINES = [
    (
        dict(
            attention="gqa:2",
            prune="heads=0.2,ffn=0.2,layers=2",
            sparsify="2:4",
            quant="int4_g128",
            quant_method="awq",
            kv_quant="int8",
        ),
        f"{FRONT},convert-gqa{{kv_heads=2}},prune-layers{{n=2}},prune-heads{{ratio=0.2}},prune-ffn{{ratio=0.2}},"
        f"sparsify{{pattern=2:4,method=wanda}},quantize-weights{{scheme=int4_g128,method=awq}},"
        f"quantize-kv{{dtype=int8}},{BACK}",
    ),
    (
        dict(
            attention="mla:96:32",
            prune="ffn=0.3,heads=0.1",
            sparsify="0.5",
            sparsify_method="magnitude",
            kv_quant="fp8_e4m3",
        ),
        f"{FRONT},convert-mla{{rank=96,rope_dims=32}},prune-ffn{{ratio=0.3}},prune-heads{{ratio=0.1}},"
        f"sparsify{{ratio=0.5,method=magnitude}},quantize-kv{{dtype=fp8_e4m3}},{BACK}",
    ),
    (
        dict(attention="mqa", prune="prune-heads{ratio=0.2},prune-layers{n=1}", quant="int8"),  # pass names: as given
        f"{FRONT},convert-gqa{{kv_heads=1}},prune-heads{{ratio=0.2}},prune-layers{{n=1}},"
        f"quantize-weights{{scheme=int8,method=rtn}},{BACK}",
    ),
    (dict(w8a8=True, kv_quant="int8"), f"{FRONT},quantize-activations,quantize-kv{{dtype=int8}},{BACK}"),
    (dict(w8a8=True, quant="int4_g128"), f"{FRONT},quantize-activations,{BACK}"),
    (
        dict(quant="int4_g32", lm_head="int8"),
        f"{FRONT},quantize-weights{{scheme=int4_g32,method=rtn,lm_head=int8}},{BACK}",
    ),
    (
        dict(passes="O0", attention="gqa:1", prune="layers=1", quant="int8"),
        "canonicalize,fuse-attention,convert-gqa{kv_heads=1},prune-layers{n=1},quantize-weights{scheme=int8,method=rtn},"
        "kv-cache,canonicalize",
    ),
    (
        dict(passes="O0", sparsify="0.5", kv_quant="int8"),
        "canonicalize,fuse-attention,sparsify{ratio=0.5,method=wanda},quantize-kv{dtype=int8},kv-cache,canonicalize",
    ),
    (
        dict(
            passes="canonicalize,fuse-attention,canonicalize,fuse-mlp,kv-cache{page_size=8}",
            prune="heads=0.5",
            quant="int8",
        ),
        "canonicalize,fuse-attention,canonicalize,prune-heads{ratio=0.5},quantize-weights{scheme=int8,method=rtn},"
        "fuse-mlp,kv-cache{page_size=8}",
    ),
    (
        dict(passes="canonicalize,fuse-attention", sparsify="2:4", quant="int8", kv_quant="int8"),
        "canonicalize,fuse-attention,sparsify{pattern=2:4,method=wanda},quantize-weights{scheme=int8,method=rtn},"
        "quantize-kv{dtype=int8}",
    ),
]


@pytest.mark.parametrize("options,expected", OPTION_PIPELINES)
def test_option_pipelines_are_unchanged(options, expected):
    options = dict(options)
    assert build_pipeline(options.pop("passes", "O1"), **options) == expected


@pytest.mark.parametrize(
    "scheme,lm_head,expected",
    [
        (
            "int4_g32",
            False,
            f"{FRONT},convert-gqa{{kv_heads=1}},quantize-weights{{scheme=int4_g32,method=rtn,"
            f"lm_head=none}},quantize-kv{{dtype=int8}},{BACK}",
        ),
        (
            "int8",
            True,
            f"{FRONT},convert-gqa{{kv_heads=1}},quantize-weights{{scheme=int8,method=rtn}},"
            f"quantize-kv{{dtype=int8}},{BACK}",
        ),
    ],
)
def test_qat_pipeline_is_unchanged(scheme, lm_head, expected):
    """A QAT-prepared model compiles with its training scheme and RTN (what kiln.compile passes on)."""
    from kiln.qat import prepare, qat_scheme

    quant, head = qat_scheme(prepare(torch.nn.Sequential(torch.nn.Linear(64, 64)), scheme, lm_head=lm_head))
    assert (
        build_pipeline("O1", attention="gqa:1", quant=quant, quant_method="rtn", kv_quant="int8", lm_head=head)
        == expected
    )


def test_without_options_the_pipeline_stays_as_written():
    assert build_pipeline("O1") == "O1"


def test_every_pass_declares_its_place():
    import kiln.targets.pim.place_pim  # noqa: F401  (registers place-pim)

    for name, info in REGISTRY.items():
        assert info.phase in PHASES or name == "canonicalize", name
        assert all(r in REGISTRY for r in info.requires + info.invalidates), name
    assert REGISTRY["place-pim"].requires == ("kv-cache",)


def test_insert_passes_places_by_phase_not_by_argument_order():
    steps = [("quantize-kv", {"dtype": "int8"}), ("prune-ffn", {"ratio": 0.5}), ("convert-gqa", {"kv_heads": 1})]
    assert insert_passes("O0", steps) == (
        "canonicalize,fuse-attention,convert-gqa{kv_heads=1},prune-ffn{ratio=0.5},"
        "quantize-kv{dtype=int8},kv-cache,canonicalize"
    )
    with pytest.raises(PassError, match="'canonicalize' has no phase"):
        insert_passes("O0", [("canonicalize", {})])


def test_required_pass_missing_or_replaced():
    with pytest.raises(
        PassError,
        match=r"'kv-cache' requires 'fuse-attention', which has not run on this graph "
        r"\(before it: canonicalize\): add fuse-attention before kv-cache",
    ):
        check_pipeline(parse_pipeline("canonicalize,kv-cache"))
    with pytest.raises(
        PassError,
        match="'quantize-kv' requires 'fuse-attention', but 'kv-cache' has since replaced "
        "what fuse-attention made: place quantize-kv before kv-cache",
    ):
        check_pipeline(parse_pipeline("O1,quantize-kv"))
    with pytest.raises(PassError, match="'convert-gqa' requires 'fuse-attention'"):
        build_pipeline("canonicalize,kv-cache", attention="gqa:1")  # refused before anything is traced
    check_pipeline(parse_pipeline("kv-cache"), history=["canonicalize", "fuse-attention"])  # ran earlier: fine
    with pytest.raises(PassError, match="place convert-gqa before kv-cache"):
        check_pipeline(parse_pipeline("convert-gqa"), history=["fuse-attention", "kv-cache"])


def test_pass_manager_checks_against_the_graphs_history(traced):
    g, _ = run_pipeline(traced["llama"], "canonicalize,fuse-attention")
    assert g.meta["pass_history"] == ["canonicalize", "fuse-attention"]
    cached, _ = run_pipeline(g, "kv-cache")  # fuse-attention ran in an earlier pipeline
    assert cached.meta["pass_history"][-1] == "kv-cache"
    with pytest.raises(PassError, match="place quantize-kv before kv-cache"):
        run_pipeline(cached, "quantize-kv")


@pytest.fixture
def test_passes():
    """Passes that exist only for these tests (removed afterwards)."""

    @register("test-scale")
    def scale(graph: Graph, factor: float, note: str = "") -> Graph:
        return graph

    @register("test-broken")
    def broken(graph: Graph) -> Graph:
        return graph.nodes + 1  # a bug in a pass: TypeError

    yield
    del REGISTRY["test-scale"], REGISTRY["test-broken"]


def test_parameters_are_checked_before_anything_runs(test_passes):
    pm = PassManager()
    with pytest.raises(
        PassError, match="pass 'kv-cache' has no parameter 'pagesize'; kv-cache accepts page_size, logits"
    ):
        pm.run(Graph(), "canonicalize,fuse-attention,kv-cache{pagesize=8}")
    assert pm.records == []
    with pytest.raises(
        PassError,
        match=r"pass 'test-scale' needs parameter 'factor' \(test-scale\{factor=...\}\); "
        "test-scale accepts factor, note",
    ):
        pm.run(Graph(), "canonicalize,test-scale{note=x}")
    with pytest.raises(PassError, match="pass 'fuse-mlp' has no parameter 'ratio'; fuse-mlp takes no parameters"):
        pm.run(Graph(), "fuse-mlp{ratio=2}")
    assert pm.records == []


def test_type_error_inside_a_pass_is_the_pass_failing(test_passes):
    with pytest.raises(PassError) as e:
        run_pipeline(Graph(), "canonicalize,test-scale{factor=2},test-broken")
    msg = str(e.value)
    assert msg.startswith("pass 'test-broken' (after canonicalize, test-scale) failed: TypeError: ")
    assert "rejected" not in msg and isinstance(e.value.__cause__, TypeError)
