"""2:4 sparse weights run compressed on the CPU (targets/cpu/sparse24.py): the kernels against the dense
computation on the same zeroed weights, the build's choice of layout (and the way to refuse it), greedy
tokens of a compressed build against the dense build of the same pruned model, and the report."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import kiln
from kiln.pass_options import build_pipeline
from kiln.report import render_report
from kiln.targets.cpu import qkernels as cq
from kiln.targets.cpu import sparse24 as S

TGT = cq.cpu_target()


def prune24(w: np.ndarray) -> np.ndarray:
    """Zero the 2 smallest |w| of every 4 consecutive inputs (what sparsify{pattern=2:4} leaves)."""
    n, k = w.shape
    g = w.reshape(n, k // 4, 4).copy()
    np.put_along_axis(g, np.argsort(np.abs(g), axis=2)[:, :, :2], 0, axis=2)
    g[: n // 3, ::5, :3] = 0  # some groups keep fewer than 2
    return g.reshape(n, k)


@pytest.mark.parametrize("quant", [None, (4, 64, False), (4, 32, True), (8, 32, False)])
def test_kernels_equal_dense_on_zeroed_weights(quant):
    """Decode (m = 1 and 3: the 1-row and the batched tiles) and prefill, ragged last block of rows, bias:
    the compressed kernel gives x @ W.T + b of the dense zeroed (fp32) or dequantized (int) weight."""
    rng = np.random.default_rng(7)
    n, k = 70, 128  # 70: a ragged last 32-lane block
    w = prune24(rng.standard_normal((n, k)).astype(np.float32))
    bias = rng.standard_normal(n).astype(np.float32)
    if quant is None:
        ref_w, packed = w, S.pack_sparse24(w)
    else:
        bits, group, sym = quant
        q, s, z = cq.quantize_rtn(w, bits, group, sym)
        ref_w = cq.dequantize(q, s, z, bits, group, sym)
        assert np.all(ref_w[w == 0] == 0)  # pruned zeros quantize to their zero point exactly
        packed = S.pack_sparse24_quant(q, s, np.zeros_like(s) if z is None else z, bits, group, sym)
    assert [(a.shape, str(a.dtype)) for a in packed] == S.sparse24_shapes(n, k, quant)
    args = [tvm.runtime.tensor(a) for a in packed] + [tvm.runtime.tensor(bias)]
    for mode in ("gemv", "gemm"):
        f = tvm.compile(tvm.IRModule({"main": S.sparse24_linear_func(k, n, True, mode, quant)}), target=TGT)["main"]
        for m in (1, 3):
            x = rng.standard_normal((m, k)).astype(np.float32)
            out = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
            f(tvm.runtime.tensor(x), *args, out)
            np.testing.assert_allclose(out.numpy(), x @ ref_w.T + bias, rtol=1e-4, atol=1e-4)


def test_compressed_bytes_and_refusals():
    rng = np.random.default_rng(1)
    w = prune24(rng.standard_normal((64, 256)).astype(np.float32))
    vals, idx = S.pack_sparse24(w)
    assert (vals.nbytes + idx.nbytes) / w.nbytes == pytest.approx(0.5 + 1 / 32)
    dense = rng.standard_normal((64, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        S.pack_sparse24(dense)
    q, s, z = cq.quantize_rtn(dense, 4, 64, False)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        S.pack_sparse24_quant(q, s, z, 4, 64, False)


def resident(manifest: dict) -> int:
    return sum(int(np.prod(w["shape"])) * np.dtype(w["dtype"]).itemsize for w in manifest["weights"])


def greedy(path: str, n: int = 16) -> list[int]:
    eng = kiln.load(path, kv_cache_tokens=256)
    params = kiln.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return eng.generate([[1, 5, 9, 22, 40, 3]], params)[0].token_ids


@pytest.fixture(scope="module")
def tied():
    """A tiny Llama whose LM head is its embedding table: with lm_head=true both are 2:4, and the embedding
    reads its rows out of the compressed layout."""
    from conftest import tiny_model

    return tiny_model("llama", tie_word_embeddings=True)


@pytest.mark.parametrize("quant", [None, "int4_g32"])
def test_compressed_build_decodes_like_dense(tied, tmp_path, quant):
    """The same 2:4 model built compressed (default) and dense (sparsify{compressed=false}): every linear and
    the tied LM head take the 2:4 layout, resident bytes drop, greedy tokens are equal."""
    pipe = build_pipeline("O1", sparsify="2:4", sparsify_method="magnitude", quant=quant)
    pipe = pipe.replace("pattern=2:4", "pattern=2:4,lm_head=true")
    art = kiln.compile(tied, target="cpu", passes=pipe)
    dense = kiln.compile(tied, target="cpu", passes=pipe.replace("pattern=2:4", "pattern=2:4,compressed=false"))
    s24 = [w for w in art.manifest["weights"] if w["transform"].startswith("s24")]
    # q, k, v, o, gate+up, down in each of 2 layers and the LM head; two fields each (fp32) or four (int4 asym)
    assert len(s24) == (6 * 2 + 1) * (2 if quant is None else 4)
    assert not any(w["transform"].startswith("s24") for w in dense.manifest["weights"])
    assert not any(w.get("storage") for w in s24)
    # resident: the fields as loaded (the dense build's 2:4 fields are stored compactly but expanded at load)
    assert resident(art.manifest) < resident(dense.manifest)
    ratio = resident({"weights": s24}) / sum(w["dense_bytes"] for w in s24)
    # int4 g32: codes halve, the scales and zero points (0.25 B/weight) stay, the index adds 0.125 B
    assert ratio == pytest.approx(0.5 + 1 / 32) if quant is None else ratio == pytest.approx(0.625 / 0.75, rel=0.05)
    assert greedy(art.save(str(tmp_path / "c"))) == greedy(dense.save(str(tmp_path / "d")))
    report = render_report(art.manifest)
    assert "## Resident weights per layer" in report and "| 0 |" in report and "| 1 |" in report
    assert "## Resident weights per layer" not in render_report(dense.manifest)


def test_not_chosen_without_exact_24(models):
    """Unstructured sparsity keeps the dense kernels (its fields are stored compactly on disk only)."""
    art = kiln.compile(models["llama"], target="cpu", sparsify="0.5", sparsify_method="magnitude")
    assert not any(w["transform"].startswith("s24") for w in art.manifest["weights"])
    assert any(w.get("storage") for w in art.manifest["weights"])
