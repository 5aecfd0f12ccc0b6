"""Cold start: the GPU cold-start benchmark's code path (run here against a CPU artifact, so that the run on
the GPU host does not fail on a typo), and cuda artifacts that carry their compiled kernels (`kiln kernels`;
the selection and the fallback are checked without a GPU, the compiling where nvcc is installed)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_cold_start_mode_runs_end_to_end_on_the_cpu(smol_artifact, tmp_path):
    """`bench/cold_start.py --gpu DIR --device cpu`: writes the weights into a copy of the artifact and a
    transformers checkpoint, times every way in fresh processes and merges the figures into the results
    file, keeping what was there."""
    results = tmp_path / "cold_start.json"
    results.write_text(json.dumps({"cpu_first_token_s": 1.5}))
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "cold_start.py"), "--gpu", smol_artifact, "--device", "cpu",
         "--runs", "1", "--work", str(tmp_path), "--results", str(results)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(results.read_text())
    assert doc["cpu_first_token_s"] == 1.5  # the CPU figures stay
    assert doc["gpu"]["headline_way"] == "kiln_warm_cache" and doc["gpu"]["device"] == "cpu"
    assert set(doc["gpu"]["first_token_s"]) == {"kiln_cold_cache", "kiln_warm_cache", "kiln_no_verify", "transformers"}
    for k in ("gpu_first_token_s", "gpu_first_token_cold_kernel_cache_s", "transformers_gpu_first_token_s"):
        assert 0 < doc[k] < 600, (k, doc[k])
    # the second token comes after the first, in every kiln run
    for way, runs in doc["gpu"]["all_runs_s"].items():
        assert all(len(t) == (1 if way == "transformers" else 2) and t == sorted(t) for t in runs), (way, runs)
    assert doc["gpu"]["weights_bytes"] > 1e6
    assert os.listdir(tmp_path) == ["cold_start.json"]  # the weights and the checkpoint are gone


# -- kernels stored in a cuda artifact ---------------------------------------------------------------------


def _has_compiler() -> bool:
    import importlib.util

    return importlib.util.find_spec("tvm") is not None and not os.environ.get("TVM_USE_RUNTIME_LIB")


@pytest.fixture(scope="module")
def cuda_art(tmp_path_factory):
    """A tiny weightless cuda artifact (fp16), built here or taken from KILN_CUDA_ARTIFACTS."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cuda_models import artifact_name, build

    src = os.environ.get("KILN_CUDA_ARTIFACTS")
    if not src:
        if not _has_compiler():
            pytest.skip("no prebuilt cuda artifacts (KILN_CUDA_ARTIFACTS) and no TVM compiler to build them")
        src = str(tmp_path_factory.mktemp("cuda"))
        build(src, models=("tiny-llama",), variants=("fp16",))
    return os.path.join(src, artifact_name("tiny-llama", "fp16"))


@pytest.fixture
def art_copy(cuda_art, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(cuda_art, dst)
    return str(dst)


def test_the_library_source_is_read_without_a_gpu(art_copy):
    from kiln.runtime.cuda_kernels import library_sources

    (code,) = library_sources(art_copy)
    assert "__global__" in code and "cuda_rms_norm_" in code


@pytest.mark.skipif(not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")), reason="needs nvcc")
def test_kiln_kernels_stores_fatbins_that_loading_prefers(art_copy, tmp_path, monkeypatch, capsys):
    """`kiln kernels`: the fatbin in kernels/, in the manifest (arch, source hash, checksum) and its file
    list; loading takes it; a tampered one is refused by the checksum pass; an unlisted one too."""
    from kiln.cli import main as cli
    from kiln.runtime.artifact import ArtifactError, read_manifest, verify_files
    from kiln.runtime.cuda import kernel_binary
    from kiln.runtime.cuda_kernels import library_sources, source_sha256

    assert cli(["kernels", art_copy]) == 0
    m = read_manifest(art_copy)
    (e,) = m["cuda_kernels"]
    (code,) = library_sources(art_copy)
    assert e["arch"] == "sm_90a" and e["source_sha256"] == source_sha256(code) and e["file"].startswith("kernels/")
    fat = open(os.path.join(art_copy, e["file"]), "rb").read()
    assert m["files"][e["file"]]["bytes"] == len(fat) and m["files"][e["file"]]["sha256"] == e["sha256"]
    assert len(fat) > 10_000
    verify_files(art_copy, m)
    monkeypatch.setenv("KILN_CUDA_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvcc to fall back on: the bytes come from the artifact
    assert kernel_binary(code, "sm_90a", art_copy, m) == fat
    assert not os.path.exists(tmp_path / "empty-cache")
    # running it again replaces the entry for this arch instead of adding one
    monkeypatch.undo()
    assert cli(["kernels", art_copy]) == 0
    assert len(read_manifest(art_copy)["cuda_kernels"]) == 1 and len(os.listdir(os.path.join(art_copy, "kernels"))) == 1
    # tampered with: the checksum pass refuses it (it is code)
    with open(os.path.join(art_copy, e["file"]), "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="checksum mismatch for kernels/"):
        verify_files(art_copy, read_manifest(art_copy))
    # a fatbin the manifest does not list is refused, not loaded unverified
    shutil.copy(os.path.join(art_copy, e["file"]), os.path.join(art_copy, "kernels", "extra.fatbin"))
    with pytest.raises(ArtifactError, match="kernels/extra.fatbin is in the artifact but not in its manifest"):
        verify_files(art_copy, read_manifest(art_copy))


def test_wrong_arch_stale_and_damaged_kernels_are_passed_over_for_the_cache(art_copy, tmp_path, monkeypatch, capsys):
    """Entries that do not fit are ignored with a note naming why, and the kernel cache (then nvcc) serves:
    here a cache filled beforehand, so no nvcc runs."""
    import hashlib

    from kiln.runtime.cuda import kernel_binary
    from kiln.runtime.cuda_kernels import artifact_kernel, library_sources, source_sha256

    (code,) = library_sources(art_copy)
    os.makedirs(os.path.join(art_copy, "kernels"))
    fake = b"not a fatbin, but bytes with a checksum"
    open(os.path.join(art_copy, "kernels", "k.fatbin"), "wb").write(fake)
    good = {"file": "kernels/k.fatbin", "arch": "sm_90a", "source_sha256": source_sha256(code),
            "sha256": hashlib.sha256(fake).hexdigest(), "bytes": len(fake)}  # fmt: skip
    m = {"cuda_kernels": [good]}
    assert artifact_kernel(art_copy, m, code, "sm_90a") == (fake, [])
    monkeypatch.setenv("KILN_CUDA_KERNELS", "0")
    assert artifact_kernel(art_copy, m, code, "sm_90a") == (None, [])
    monkeypatch.delenv("KILN_CUDA_KERNELS")
    cases = {
        "compiled for sm_80, this artifact runs sm_90a": dict(good, arch="sm_80"),
        "another kernel source": dict(good, source_sha256="0" * 64),
        "does not match its recorded SHA-256": dict(good, sha256="0" * 64),
        "cannot be read": dict(good, file="kernels/missing.fatbin"),
        "malformed": {"file": 3},
    }
    cache = tmp_path / "cache"
    cache.mkdir()
    key = hashlib.sha256(("sm_90a\0" + code).encode()).hexdigest()[:32]
    (cache / f"{key}.sm_90a.fatbin").write_bytes(b"from the cache")
    monkeypatch.setenv("KILN_CUDA_CACHE", str(cache))
    for why, entry in cases.items():
        data, notes = artifact_kernel(art_copy, {"cuda_kernels": [entry]}, code, "sm_90a")
        assert data is None and why in notes[0] and "compiling with nvcc" in notes[-1], (why, notes)
        capsys.readouterr()
        assert kernel_binary(code, "sm_90a", art_copy, {"cuda_kernels": [entry]}) == b"from the cache"
        assert why in capsys.readouterr().err
    # the first fitting entry wins over ones passed over
    data, notes = artifact_kernel(art_copy, {"cuda_kernels": [cases["another kernel source"], good]}, code, "sm_90a")
    assert data == fake and len(notes) == 1


def test_kiln_kernels_refuses_a_cpu_artifact_with_the_fix(smol_artifact, capsys):
    from kiln.cli import main as cli

    assert cli(["kernels", smol_artifact]) == 1
    assert "is for target 'cpu'" in capsys.readouterr().err


def test_a_cuda_bundle_keeps_the_cuda_runtime(art_copy, tmp_path):
    from kiln.bundle import make_bundle

    info = make_bundle(art_copy, str(tmp_path / "b"), tar=False)
    assert os.path.isfile(os.path.join(info.path, "lib", "tvm", "lib", "libtvm_runtime_cuda.so"))
    assert not os.path.exists(os.path.join(info.path, "lib", "tvm", "lib", "libtvm_compiler.so"))
    assert json.load(open(os.path.join(info.path, "bundle.json")))["artifact"]["target"]["name"] == "cuda"
