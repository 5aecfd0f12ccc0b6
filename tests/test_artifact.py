"""Artifacts: self-describing, verified on load, refused with a reason when wrong, written atomically."""

import json
import os
import shutil

import pytest

import kiln
from kiln.runtime.artifact import ArtifactError, read_manifest


@pytest.fixture
def art(artifacts, tmp_path):
    """A private copy of the compiled tiny Llama that a test may damage."""
    dst = tmp_path / "art"
    shutil.copytree(artifacts["llama"], dst)
    return dst


def _edit_manifest(path, fn):
    mf = path / "manifest.json"
    m = json.loads(mf.read_text())
    fn(m)
    mf.write_text(json.dumps(m))


def test_manifest_describes_the_build(artifacts):
    m = read_manifest(artifacts["llama"])
    assert m["schema_version"] == 1 and m["target"]["name"] == "cpu" and m["tvm_version"].startswith("0.27")
    assert set(m["entry_points"]) == {"prefill", "decode", "verify"}
    assert [p["name"] for p in m["passes"]][:2] == ["canonicalize", "fuse-norms"]
    assert m["kv_cache"]["page_size"] == 16 and len(m["kv_cache"]["layers"]) == 2
    assert {"model.so", "weights.safetensors", "report.md", "ir.txt"} <= set(m["files"])
    assert "cached_attention" in open(os.path.join(artifacts["llama"], "ir.txt")).read()


def test_corrupted_weights_are_refused(art):
    w = art / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for weights.safetensors"):
        kiln.load(str(art))


def test_truncated_and_missing_files_are_refused(art):
    lib = art / "model.so"
    lib.write_bytes(lib.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="model.so has 1000 bytes"):
        kiln.load(str(art))
    lib.unlink()
    with pytest.raises(ArtifactError, match="model.so is missing"):
        kiln.load(str(art))


def test_wrong_target_is_refused(art):
    _edit_manifest(art, lambda m: m["target"].update(name="tpu"))
    with pytest.raises(ArtifactError, match="built for target 'tpu', not 'cpu'"):
        kiln.load(str(art))


def test_gpu_artifact_without_gpu_is_refused(art):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    _edit_manifest(art, lambda m: m["target"].update(name="cuda", arch="sm_90a", compute_capability="9.0"))
    with pytest.raises(ArtifactError, match="no CUDA GPU is visible"):
        kiln.load(str(art))


def test_missing_cpu_features_are_refused(art):
    _edit_manifest(art, lambda m: m["target"].update(requires=["avx9000"]))
    with pytest.raises(ArtifactError, match="needs avx9000"):
        kiln.load(str(art))


def test_newer_schema_is_refused(art):
    _edit_manifest(art, lambda m: m.update(schema_version=99))
    with pytest.raises(ArtifactError, match="schema version 99 is newer"):
        kiln.load(str(art))


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        kiln.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        kiln.load(str(tmp_path))


def test_save_is_atomic(models, tmp_path, monkeypatch):
    art = kiln.compile(models["gpt2"])
    out = tmp_path / "a"
    art.save(str(out))
    before = sorted(os.listdir(out))
    import safetensors.numpy

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        art.save(str(out))
    assert sorted(os.listdir(out)) == before  # the old artifact is intact
    assert os.listdir(tmp_path) == ["a"]  # and no half-written directory is left behind
    kiln.load(str(out))
    with pytest.raises(OSError):
        art.save(str(tmp_path / "b"))
    assert os.listdir(tmp_path) == ["a"]


def test_unknown_target_and_pipeline_without_kv_cache(models):
    with pytest.raises(kiln.KilnError, match="unknown target 'tpu'"):
        kiln.compile(models["llama"], target="tpu")
    with pytest.raises(kiln.KilnError, match="has no kv-cache pass"):
        kiln.compile(models["llama"], passes="canonicalize")


def test_build_cache_key_ignores_options_left_at_their_defaults(monkeypatch):
    """`kiln build` passes every option explicitly; the Python API passes none. Same build, same key."""
    from kiln import api

    keys = []

    def record(*a):
        keys.append(a)
        raise RuntimeError("stop before building")

    monkeypatch.setattr(api, "build_key", record)
    for kw in ({}, {"quant_method": "rtn", "dump_ir": None}, {"quant": "int8"}):
        with pytest.raises(RuntimeError):
            api.cached_build("smollm2-135m", "/nonexistent/out", **kw)
    assert keys[0] == keys[1] and keys[0] != keys[2]
