"""Deployment without the compiler: the runtime imports neither torch nor TVM's compiler, and a bundle
(`kiln bundle`) unpacked elsewhere generates with its own packages alone, token for token as the full
install does. The model is conftest's tiny Llama with SmolLM2's real tokenizer (`smol_artifact`)."""

import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
from importlib import metadata

import pytest
import tomllib
from packaging.requirements import Requirement

import kiln
from kiln.runtime.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# As on a runtime install (`pip install 'kiln[serve]'`): the packages named in argv[2] are absent. Load,
# generate (static batch and through the Server, with the chat template), serve over HTTP on 127.0.0.1 and
# ask for a completion and for JSON output; then print what was imported
_PROBE = """
import importlib.abc, json, sys, threading, time, urllib.error, urllib.request
at_start = set(sys.modules)  # the interpreter's own start (site, .pth files), not the runtime's doing
absent = set(json.loads(sys.argv[2]))
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in absent:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
import kiln.runtime
from kiln.runtime.engine import Engine
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.serving import Server
from kiln.runtime.openai_api import OpenAIServer
import uvicorn
eng = Engine(sys.argv[1], kv_cache_tokens=256)
a = eng.generate(["Hi"], SamplingParams(max_tokens=6), chat=True)[0].token_ids
with Server(eng, max_batch=2) as srv:
    b = srv.submit("Hi", SamplingParams(max_tokens=6), chat=True).result().token_ids
    web = uvicorn.Server(uvicorn.Config(OpenAIServer(srv, "m", close_server=False).app, host="127.0.0.1", port=0,
                                        log_level="warning"))
    threading.Thread(target=web.run, daemon=True).start()
    while not web.started:
        time.sleep(0.02)
    port = web.servers[0].sockets[0].getsockname()[1]
    def post(**extra):
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                     data=json.dumps({**body, **extra}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
    http, structured = post(), post(response_format={"type": "json_object"})
    web.should_exit = True
mods = sorted(set(sys.modules) - at_start)
print(json.dumps({"tokens": [a, b], "http": http, "structured": structured, "modules": mods}))
"""


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots) -> set[str]:
    """The installed distributions that `pip install` of `roots` brings (requirements without extras)."""
    todo, found = [_canon(r) for r in roots], set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for r in metadata.requires(name) or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_canon(req.name))
    return found


@pytest.fixture(scope="module")
def split():
    """pyproject.toml's split: the runtime install (no extra, plus [serve]) and what only the compile side
    ([compiler], and [structured], whose xgrammar imports torch) brings, as installed distributions."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = lambda reqs: {_canon(Requirement(r).name) for r in reqs}
    base, extras = names(project["dependencies"]), project["optional-dependencies"]
    runtime = _closure(base | names(extras["serve"]))
    return {
        "base": base,
        "serve": names(extras["serve"]),
        "runtime": runtime,
        "compile_only": _closure(names(extras["compiler"]) | names(extras["structured"])) - runtime,
    }


def test_the_bundle_copies_the_runtime_install(split):
    """kiln bundle's package lists are pyproject's: the runtime install, and [serve] for --serve."""
    from kiln.bundle import LEFT_OUT, RUNTIME_DISTS, SERVE_DISTS

    assert {_canon(d) for d in RUNTIME_DISTS} == split["base"]
    assert {_canon(d) for d in SERVE_DISTS} == split["serve"] - set(LEFT_OUT)
    for heavy in ("torch", "transformers", "safetensors", "xgrammar", "triton"):
        assert heavy in split["compile_only"] and heavy not in split["runtime"], heavy


@pytest.mark.parametrize("runtime_lib", [True, False], ids=["runtime-lib", "full-tvm"])
def test_runtime_imports_neither_torch_nor_the_compiler(smol_artifact, engine_tokens, split, runtime_lib):
    """With the compile side's packages absent, as on a runtime install, an artifact loads, generates and
    is served over HTTP, every module imported comes from the runtime install's distributions, and JSON
    output is refused with the fix named. With TVM_USE_RUNTIME_LIB=1 (what a bundle sets) tvm.relax stays
    out too; without it TVM loads its compiler library and tvm.relax, but torch still stays out."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    if runtime_lib:
        env["TVM_USE_RUNTIME_LIB"] = "1"
    owners: dict[str, set[str]] = {}  # top-level module -> the distributions that install it
    for mod, dists in metadata.packages_distributions().items():
        owners[mod] = {_canon(d) for d in dists}
    # everything installed here that a runtime install lacks: the compile side, the tests' tools, ...
    runtime = split["runtime"] | {"kiln"}
    absent = sorted(m for m, ds in owners.items() if not ds & runtime)
    assert {"torch", "transformers", "safetensors", "xgrammar"} <= set(absent)
    r = subprocess.run([sys.executable, "-c", _PROBE, smol_artifact, json.dumps(absent)], capture_output=True,
                       text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    mods = set(out["modules"])
    assert "tvm" in mods and "tvm.runtime.vm" in mods and "uvicorn" in mods
    for heavy in ("torch", "transformers", "xgrammar", "triton") + (("tvm.relax",) if runtime_lib else ()):
        assert heavy not in mods, f"{heavy} was imported while loading and serving an artifact"
    compile_side = sorted(m for m in mods if m.startswith("kiln.") and not m.startswith("kiln.runtime"))
    assert compile_side == [], compile_side
    outside = sorted(
        (m, sorted(owners[m])) for m in {m.partition(".")[0] for m in mods} if m in owners and not owners[m] & runtime
    )
    assert outside == [], f"imported from distributions that the runtime install does not declare: {outside}"
    assert out["tokens"] == [engine_tokens, engine_tokens]
    status, body = out["http"]
    assert status == 200 and body["usage"]["completion_tokens"] == len(engine_tokens), body
    status, body = out["structured"]
    assert status == 400 and "kiln[structured]" in body["error"]["message"], body


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
        # JSON output needs xgrammar (and so torch), which a bundle leaves out: a 400 that names the fix
        with pytest.raises(openai.BadRequestError, match=re.escape("kiln[structured]")):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                      response_format={"type": "json_object"})  # fmt: skip
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


def test_weights_hashed_while_read_are_the_ones_loaded(smol_artifact, engine_tokens, tmp_path):
    """`kiln run`/`serve` (hand_verified_weights_to_loader) hash the weights while reading them into the
    engine's memory: the same digest as a plain hash, the same tokens, and a damaged file is refused with
    nothing kept for the loader."""
    import shutil

    from kiln.runtime import artifact, integrity

    art = tmp_path / "a"
    shutil.copytree(smol_artifact, art)
    w = str(art / "weights.safetensors")
    assert artifact.hash_and_keep(w, "not this") == integrity.sha256_file(w) and artifact._kept == {}
    artifact.hand_verified_weights_to_loader()
    try:
        eng = kiln.load(str(art), kv_cache_tokens=256)
        assert artifact._kept == {}  # the engine took what the checksum pass read
        assert eng.generate(["Hi"], SamplingParams(max_tokens=6), chat=True)[0].token_ids == engine_tokens
        with open(w, "r+b") as f:  # one byte of the last array
            f.seek(-1, os.SEEK_END)
            b = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([b[0] ^ 0xFF]))
        with pytest.raises(artifact.ArtifactError, match="checksum mismatch for weights.safetensors"):
            kiln.load(str(art), kv_cache_tokens=256)
        assert artifact._kept == {}
    finally:
        integrity.HASHING_READERS.clear()


def test_kiln_run_refuses_damaged_weights_before_any_token(smol_artifact, tmp_path):
    """`kiln run` checks the weights on a thread while TVM, the library and the tokenizer load: one flipped
    byte in the middle of the weights still ends the process with the file named, before any text."""
    import shutil

    art = tmp_path / "a"
    shutil.copytree(smol_artifact, art)
    w = art / "weights.safetensors"
    with open(w, "r+b") as f:
        f.seek(w.stat().st_size // 2)
        b = f.read(1)
        f.seek(w.stat().st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    r = subprocess.run([sys.executable, "-m", "kiln.runtime.cli", "run", str(art), "--prompt", "Hi", "--max-tokens",
                        "2"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    assert "checksum mismatch for weights.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_piecewise_sha256_checks_large_weights_on_every_core(smol_artifact, engine_tokens, tmp_path, monkeypatch):
    """Without blake3, a large file's piecewise SHA-256 (pieces hashed on a thread each) is what the loader
    checks: read into the engine's memory while hashed, the same tokens, and one flipped byte refused."""
    import shutil

    from kiln.runtime import artifact, integrity

    art = tmp_path / "a"
    shutil.copytree(smol_artifact, art)
    monkeypatch.setattr(integrity, "PIECES_FROM", 0)
    monkeypatch.setattr(integrity, "PIECE_BYTES", 1 << 20)
    monkeypatch.setattr(integrity, "_blake3", lambda: None)  # a host without the blake3 package
    w = art / "weights.safetensors"
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["weights.safetensors"] = entry = integrity.file_entry(str(w))
    (art / "manifest.json").write_text(json.dumps(m))
    (art / "manifest.sha256").write_text(integrity.manifest_sum_line(str(art / "manifest.json")))
    assert w.stat().st_size > 4 << 20 and "blake3" not in entry
    assert integrity.checked_digest(entry) == ("sha256_pieces:1048576", entry["sha256_pieces"]["root"])
    artifact.hand_verified_weights_to_loader()
    try:
        eng = kiln.load(str(art), kv_cache_tokens=256)
        assert artifact._kept == {}  # the engine took what the checksum pass read
        assert eng.generate(["Hi"], SamplingParams(max_tokens=6), chat=True)[0].token_ids == engine_tokens
        with open(w, "r+b") as f:  # one byte in the middle of the file
            f.seek(w.stat().st_size // 2)
            b = f.read(1)
            f.seek(w.stat().st_size // 2)
            f.write(bytes([b[0] ^ 0xFF]))
        with pytest.raises(artifact.ArtifactError, match="checksum mismatch for weights.safetensors"):
            kiln.load(str(art), kv_cache_tokens=256)
    finally:
        integrity.HASHING_READERS.clear()
    with pytest.raises(artifact.ArtifactError, match="checksum mismatch for weights.safetensors"):
        integrity.verify_files(str(art), m)  # the plain pass (kiln inspect --verify) too
