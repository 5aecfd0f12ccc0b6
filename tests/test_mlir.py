"""The `mlir` target: optimized IR -> functional PyTorch program -> torch-mlir, executed with the
reference backend (linalg-on-tensors -> LLVM) and checked against the CPU target and the interpreter."""

import json
import os
import re

import numpy as np
import pytest
import torch

pytest.importorskip("torch_mlir")

from conftest import rel_err, tiny_model

import kiln
from kiln import interp
from kiln.errors import KilnError, UnsupportedOpError
from kiln.pass_options import build_pipeline
from kiln.passmgr import run_pipeline
from kiln.targets.mlir import export as M
from kiln.targets.mlir.target import MlirArtifact
from kiln.trace import trace

PAGES = 8  # KV pages of 16 tokens in every cache below
STATIC = {"batch": 2, "tokens": 8, "max_pages": 4, "pages": PAGES}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def traced_llama(llama):
    return trace(llama, max_tokens=256)


@pytest.fixture(scope="module")
def graph(traced_llama):
    g, _ = run_pipeline(traced_llama, "O1")
    return g


@pytest.fixture(scope="module")
def cpu(llama, tmp_path_factory):
    path = kiln.compile(llama, target="cpu", passes="O1").save(str(tmp_path_factory.mktemp("cpu") / "llama"))
    return kiln.load(path, kv_cache_tokens=PAGES * 16)


@pytest.fixture(scope="module")
def exported(graph, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mlir"))
    return out, M.export_mlir(graph, out, ["torch", "linalg-on-tensors", "stablehlo"])


@pytest.fixture(scope="module")
def backends(exported):
    _, res = exported
    return {e: M.RefBackend(open(res["files"][f"{e}.linalg-on-tensors"]).read(), opt_level=0) for e in M.ENTRY_POINTS}


def _weights(res, entry):
    from safetensors.numpy import load_file

    w = load_file(res["files"]["weights"])
    return [w[a["name"]] for a in res["entry_points"][entry]["args"] if a["kind"] == "weight"]


def _caches(graph):
    return [c.numpy() for c in M.to_torch_module(graph).empty_caches(PAGES)]


def test_export_every_form_keeps_weights_as_arguments(graph, exported):
    out, res = exported
    assert set(M.SUPPORTED_FORMS) == {"torch", "linalg-on-tensors", "tosa", "stablehlo"}
    n_layers = len(graph.meta["kv_cache"]["layers"])
    wbytes = os.path.getsize(res["files"]["weights"])
    for entry in ("prefill", "decode"):
        args = res["entry_points"][entry]["args"]
        assert [a["name"] for a in args[:3]] == ["input_ids", "positions", "page_table"]
        assert [a["kind"] for a in args[3 : 3 + n_layers]] == ["kv_cache"] * n_layers
        assert sorted(a["name"] for a in args if a["kind"] == "weight") == sorted(graph.params)
        for form in ("torch", "linalg-on-tensors", "stablehlo"):
            path = res["files"][f"{entry}.{form}"]
            assert os.path.basename(path) == f"{entry}.{form}.mlir"
            text = open(path).read()
            assert "dense_resource" not in text and "vtensor.literal(dense<[" not in text
            assert os.path.getsize(path) < wbytes  # the weights are not in there
            sig = re.search(rf"func.func @{entry}\((.*?)\)\s*->", text, re.S).group(1)
            assert sig.count("%arg") == len(args)  # every weight is a function argument
        # symbolic sizes survive: batch for decode, tokens for prefill, pages and max_pages for both
        sig = re.search(rf"func.func @{entry}\((.*?)\)", open(res["files"][f"{entry}.linalg-on-tensors"]).read()).group(
            1
        )
        assert ("tensor<1x?xi64>" if entry == "prefill" else "tensor<?x1xi64>") in sig
        assert "tensor<?x2x3x16x8xf32>" in sig
    assert json.load(open(res["files"]["entry_points"]))["entry_points"]["decode"]["bind"] == {"tokens": 1}
    assert any("cached_attention" in n and "index_put" in n for n in res["notes"])
    assert any("function arguments" in n for n in res["notes"])


def test_tosa_needs_static_shapes_and_names_the_op(graph, tmp_path):
    with pytest.raises(M.MlirFormError) as e:
        M.export_mlir(graph, str(tmp_path / "dyn"), ["tosa"], entry_points=["prefill"])
    assert isinstance(e.value, UnsupportedOpError) and isinstance(e.value, KilnError)
    msg = str(e.value)
    assert e.value.form == "tosa" and e.value.op in msg and "'tosa' form" in msg and "static_shapes" in msg
    assert e.value.op in {n.op for n in graph.nodes}  # a kiln op, not an MLIR one
    # fixed sizes lower, here through the artifact writer kiln.compile(target="mlir") uses
    from kiln.runtime.artifact import read_manifest, verify_files

    path = MlirArtifact(
        graph,
        ["tosa"],
        {"schema_version": 1, "name": "llama", "pipeline": "O1", "kv_cache": graph.meta["kv_cache"]},
        static_shapes=STATIC,
    ).save(str(tmp_path / "art"))
    m = read_manifest(path)
    verify_files(path, m)
    assert m["target"]["name"] == "mlir" and m["target"]["forms"] == ["tosa"]
    assert {"prefill.tosa.mlir", "decode.tosa.mlir", "weights.safetensors", "report.md", "ir.txt"} <= set(m["files"])
    assert set(m["entry_points"]) == {"prefill", "decode"}
    text = open(os.path.join(path, "decode.tosa.mlir")).read()
    assert "tosa." in text and "tensor<2x1xi64>" in text and "tensor<8x2x3x16x8xf32>" in text


def test_unknown_form_is_refused(graph, tmp_path):
    with pytest.raises(KilnError, match="unknown MLIR form.*linalg"):
        M.export_mlir(graph, str(tmp_path), ["llvm"])


def test_reconstructed_program_matches_interpreter(graph):
    prog = M.to_torch_module(graph)
    assert isinstance(prog, torch.nn.Module) and len(dict(prog.named_buffers())) == len(graph.params)
    ids = torch.randint(0, 97, (1, 19))
    pos = torch.arange(19, dtype=torch.int32)[None]
    pt = torch.tensor([[5, 2]], dtype=torch.int32)
    caches = prog.empty_caches(PAGES)
    ref_caches = [c.clone() for c in caches]
    out = prog.prefill(ids, pos, pt, *caches)
    ref = interp.run(
        graph,
        {
            "input_ids": ids,
            "positions": pos,
            "page_table": pt,
            **{f"kv_cache_{i}": c for i, c in enumerate(ref_caches)},
        },
    )
    assert rel_err(out[0], ref[0]) < 1e-5
    for new, r, old in zip(out[1:], ref_caches, caches):
        assert torch.equal(old, torch.zeros_like(old))  # functional: inputs untouched
        assert rel_err(new, r) < 1e-5  # same cache contents as the in-place reference


def test_executed_linalg_matches_cpu_target_prefill_and_decode(graph, exported, backends, cpu):
    """Run the exported linalg-on-tensors MLIR (RefBackend) and the CPU artifact side by side."""
    _, res = exported
    wp, wd = _weights(res, "prefill"), _weights(res, "decode")
    caches = _caches(graph)
    prompts, pages = [[5, 6, 7, 8, 9, 10, 11], list(range(20, 45))], [[3], [6, 1]]
    last = []
    for ids, pg in zip(prompts, pages):
        n = len(ids)
        out = backends["prefill"].call(
            "prefill",
            np.array([ids], np.int64),
            np.arange(n, dtype=np.int32)[None],
            np.array([pg], np.int32),
            *caches,
            *wp,
        )
        caches = list(out[1:])
        want = cpu.prefill(ids, pg)
        assert rel_err(out[0][0, -1], want) < 1e-4
        last.append(int(want.argmax()))
    pos = [len(p) for p in prompts]
    for _ in range(3):  # decode a batch of two sequences of different lengths
        pt = np.array([pg + [0] * (2 - len(pg)) for pg in pages], np.int32)
        out = backends["decode"].call(
            "decode", np.array(last, np.int64)[:, None], np.array(pos, np.int32)[:, None], pt, *caches, *wd
        )
        caches = list(out[1:])
        want = cpu.decode(last, pos, pages)
        assert rel_err(out[0][:, -1], want) < 1e-4
        last, pos = [int(t) for t in want.argmax(-1)], [p + 1 for p in pos]


def test_int8_graph_exports_with_dequantize_lowering(traced_llama, tmp_path):
    g, _ = run_pipeline(traced_llama, build_pipeline("O1", quant="int8"))
    assert g.find("qweight")
    res = M.export_mlir(g, str(tmp_path), ["linalg-on-tensors"], entry_points=["prefill"])
    assert any(n.startswith("qweight") and "dequantize" in n for n in res["notes"])
    codes = [a for a in res["entry_points"]["prefill"]["args"] if a["name"].endswith(".codes")]
    assert codes and all(a["dtype"] == "uint8" for a in codes)
    text = open(res["files"]["prefill.linalg-on-tensors"]).read()
    assert "x48xi8>" in text  # packed codes stay 8-bit arguments
    ids = torch.randint(0, 97, (1, 9))
    pos, pt = torch.arange(9, dtype=torch.int32)[None], torch.tensor([[4]], dtype=torch.int32)
    caches = _caches(g)
    out = M.RefBackend(text, opt_level=0).call(
        "prefill", ids.numpy(), pos.numpy(), pt.numpy(), *caches, *_weights(res, "prefill")
    )
    ref = interp.run(
        g,
        {
            "input_ids": ids,
            "positions": pos,
            "page_table": pt,
            **{f"kv_cache_{i}": torch.from_numpy(c.copy()) for i, c in enumerate(caches)},
        },
    )
    assert rel_err(out[0], ref[0]) < 1e-4


@pytest.mark.slow
def test_smollm2_fp32_and_int8_linalg_match(tmp_path):
    from kiln.models import load_model

    lm = load_model("smollm2-135m")
    traced = trace(lm.model)
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    n = len(ids)
    x, pos = torch.tensor([ids]), torch.arange(n, dtype=torch.int32)[None]
    pt = torch.tensor([[2]], dtype=torch.int32)
    for name, pipe in (("fp32", "O1"), ("int8", build_pipeline("O1", quant="int8"))):
        g, _ = run_pipeline(traced, pipe)
        res = M.export_mlir(g, str(tmp_path / name), ["linalg-on-tensors"], entry_points=["prefill"])
        path = res["files"]["prefill.linalg-on-tensors"]
        assert os.path.getsize(path) < os.path.getsize(res["files"]["weights"]) / 100
        caches = [c.numpy() for c in M.to_torch_module(g).empty_caches(4)]
        out = M.RefBackend(open(path).read(), opt_level=0).call(
            "prefill", x.numpy(), pos.numpy(), pt.numpy(), *caches, *_weights(res, "prefill")
        )
        ref = interp.run(
            g,
            {
                "input_ids": x,
                "positions": pos,
                "page_table": pt,
                **{f"kv_cache_{i}": torch.from_numpy(c.copy()) for i, c in enumerate(caches)},
            },
        )[0]
        assert rel_err(out[0], ref) < 1e-4, name


def test_cli_build_and_inspect_mlir(tmp_path):
    """`kiln build --target mlir --mlir-form linalg-on-tensors` from a transformers folder, then inspect."""
    import subprocess
    import sys

    from conftest import tiny_model

    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    out = tmp_path / "art"
    run = lambda *a: subprocess.run([sys.executable, "-m", "kiln.cli", *a], capture_output=True, text=True, timeout=600)
    r = run("build", str(src), "-o", str(out), "--target", "mlir", "--mlir-form", "linalg-on-tensors", "--no-cache")
    assert r.returncode == 0, r.stderr
    assert (out / "prefill.linalg-on-tensors.mlir").exists() and (out / "decode.linalg-on-tensors.mlir").exists()
    r = run("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "## MLIR" in r.stdout and "prefill(input_ids:" in r.stdout and "prefill.linalg-on-tensors.mlir" in r.stdout
