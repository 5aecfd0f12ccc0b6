"""Deployment without the compiler: the runtime imports neither torch nor TVM's compiler, and a bundle
(`kiln bundle`) unpacked elsewhere generates with its own packages alone, token for token as the full
install does. The model is conftest's tiny Llama with SmolLM2's real tokenizer (`smol_artifact`)."""

import json
import os
import socket
import subprocess
import sys
import tarfile
import time

import pytest

import kiln
from kiln.runtime.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Load, generate (static batch and through the Server, with the chat template), import the HTTP layer;
# then print what was imported
_PROBE = """
import json, sys
import kiln.runtime
from kiln.runtime.engine import Engine
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.serving import Server
import kiln.runtime.openai_api
eng = Engine(sys.argv[1], kv_cache_tokens=256)
a = eng.generate(["Hi"], SamplingParams(max_tokens=6), chat=True)[0].token_ids
with Server(eng, max_batch=2) as srv:
    b = srv.submit("Hi", SamplingParams(max_tokens=6), chat=True).result().token_ids
print(json.dumps({"tokens": [a, b], "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("runtime_lib", [True, False], ids=["runtime-lib", "full-tvm"])
def test_runtime_imports_neither_torch_nor_the_compiler(smol_artifact, engine_tokens, runtime_lib):
    """With TVM_USE_RUNTIME_LIB=1 (what a bundle sets) nothing of the compile side is imported; without it
    TVM loads its compiler library and tvm.relax, but torch still stays out (`kiln run` starts faster)."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    if runtime_lib:
        env["TVM_USE_RUNTIME_LIB"] = "1"
    r = subprocess.run([sys.executable, "-c", _PROBE, smol_artifact], capture_output=True, text=True, env=env,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    mods = set(out["modules"])
    assert "tvm" in mods and "tvm.runtime.vm" in mods
    for heavy in ("torch", "transformers", "xgrammar", "triton") + (("tvm.relax",) if runtime_lib else ()):
        assert heavy not in mods, f"{heavy} was imported while loading and serving an artifact"
    compile_side = sorted(m for m in mods if m.startswith("kiln.") and not m.startswith("kiln.runtime"))
    assert compile_side == [], compile_side
    assert out["tokens"] == [engine_tokens, engine_tokens]


@pytest.fixture(scope="module")
def engine_tokens(smol_artifact):
    """The full install's greedy answer to "Hi" (chat template applied)."""
    eng = kiln.load(smol_artifact, kv_cache_tokens=256)
    return eng.generate(["Hi"], SamplingParams(max_tokens=6), chat=True)[0].token_ids


def _fresh_python(where) -> str:
    """A venv without pip or any package: the bundle must bring everything but the standard library."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    return str(where / "bin" / "python")


def test_bundle_unpacked_elsewhere_generates_and_serves_as_the_full_install(smol_artifact, engine_tokens, tmp_path):
    from kiln.bundle import make_bundle

    info = make_bundle(smol_artifact, str(tmp_path / "made" / "b"), serve=True)
    assert info.archive and os.path.getsize(info.archive) == info.bytes_archive
    assert info.bytes_runtime < 200e6  # python packages and launchers; numpy and tokenizers are most of it
    with tarfile.open(info.archive) as tf:
        tf.extractall(tmp_path / "unpacked", filter="data")
    b = tmp_path / "unpacked" / "b"
    assert not (b / "lib" / "tvm" / "lib" / "libtvm_compiler.so").exists()
    assert (b / "lib" / "tvm" / "lib" / "libtvm_runtime.so").is_file()
    for gone in ("torch", "transformers", "xgrammar", "tvm/relax", "tvm/3rdparty", "tvm/include", "tvm/src"):
        assert not (b / "lib" / gone).exists(), gone
    manifest = json.loads((b / "bundle.json").read_text())
    assert manifest["packages"]["apache-tvm"] == "0.27.0.post1" and "fastapi" in manifest["packages"]
    from kiln.runtime.integrity import sha256_file

    for rel in ("run", "boot.py", "lib/tvm/lib/libtvm_runtime.so", "lib/kiln/runtime/engine.py"):
        assert manifest["files"][rel]["sha256"] == sha256_file(str(b / rel)), rel

    py = _fresh_python(tmp_path / "venv")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KILN_PYTHON": py, "HOME": str(tmp_path)}
    # the fresh interpreter cannot see torch or the host's TVM
    probe = "import importlib.util as u; print([u.find_spec(m) is None for m in ('torch', 'tvm', 'kiln')])"
    assert subprocess.run([py, "-I", "-c", probe], capture_output=True, text=True, env=env).stdout.strip() == (
        "[True, True, True]"
    )
    r = subprocess.run([str(b / "run"), "--prompt", "Hi", "--max-tokens", "6", "--json"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert row["token_ids"] == engine_tokens

    # a bad flag is one clear line, not a traceback
    r = subprocess.run([str(b / "run"), "--prompt", "Hi", "--temperature", "nan"], capture_output=True, text=True,
                       env=env, timeout=120)  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr and "temperature" in r.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(b / "serve"), "--port", str(port), "--model-name", "m", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        import openai

        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.time() + 120
        while True:
            try:
                c.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "the bundle's server did not start"
                time.sleep(0.1)
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                      temperature=0)  # fmt: skip
        assert (r.usage.completion_tokens, r.choices[0].message.content) == (len(engine_tokens), row["text"])
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    # another interpreter than the bundle's is refused with both named
    manifest["python"]["version"] = "3.99"
    (b / "bundle.json").write_text(json.dumps(manifest))
    r = subprocess.run([str(b / "run"), "--prompt", "Hi"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "made for cpython 3.99" in r.stderr and "KILN_PYTHON" in r.stderr, r.stderr


def test_bundle_refuses_a_bad_artifact_and_an_existing_folder(tmp_path, smol_artifact):
    from kiln.bundle import make_bundle
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match="not an artifact"):
        make_bundle(str(tmp_path / "nothing"), str(tmp_path / "b"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(KilnError, match="exists"):
        make_bundle(smol_artifact, str(tmp_path / "taken"))


def test_damaged_weights_are_refused_without_the_checksums(smol_artifact, tmp_path):
    """Weights are read through a memory map; a damaged file is still an ArtifactError, with verify off too."""
    import shutil

    from kiln.runtime.artifact import ArtifactError

    art = tmp_path / "a"
    shutil.copytree(smol_artifact, art)
    w = art / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        kiln.load(str(art), verify=False)
    w.write_bytes(b"\xff" * 64)
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        kiln.load(str(art), verify=False)
