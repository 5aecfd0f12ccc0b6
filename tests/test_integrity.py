"""Artifact integrity (everything loaded is what the build wrote, checked before it is opened), the
sandboxed chat template, and saves that a crash at any step leaves with the old or the new artifact."""

import json
import os
import shutil
import subprocess

import pytest

import kiln
from kiln import atomic_dir
from kiln.artifact import copy_artifact, write_artifact
from kiln.cli import main as cli
from kiln.runtime.artifact import ArtifactError, read_manifest, verify_files
from kiln.runtime.integrity import manifest_sum_line


@pytest.fixture
def art(artifacts, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(artifacts["llama"], dst)
    return dst


def _rewrite(path, fn, resum=True):
    """Edit the manifest; with `resum` also rewrite manifest.sha256, as someone forging an artifact would,
    so that the check under test is the one that refuses it."""
    mf = path / "manifest.json"
    m = json.loads(mf.read_text())
    fn(m)
    mf.write_text(json.dumps(m))
    if resum:
        (path / "manifest.sha256").write_text(manifest_sum_line(str(mf)))


def test_an_edited_manifest_is_refused(art):
    _rewrite(art, lambda m: m["kv_cache"].update(page_size=32), resum=False)
    with pytest.raises(ArtifactError, match="manifest.json does not match manifest.sha256"):
        kiln.load(str(art))
    (art / "manifest.sha256").unlink()
    with pytest.raises(ArtifactError, match="has no manifest.sha256"):
        kiln.load(str(art))


def test_an_unlisted_substituted_library_is_refused_before_it_is_opened(art, tmp_path):
    """A library whose constructor leaves a mark, put in place of model.so and taken off the list."""
    mark = tmp_path / "constructor-ran"
    src = tmp_path / "evil.c"
    src.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void run(void) "
        f'{{ FILE *f = fopen("{mark}", "w"); if (f) fclose(f); }}\n'
    )
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the substitute library")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(art / "model.so"), str(src)], check=True)
    _rewrite(art, lambda m: m["files"].pop("model.so"))
    with pytest.raises(ArtifactError, match="model.so is in the artifact but not in its manifest"):
        kiln.load(str(art))
    assert not mark.exists()
    _rewrite(
        art, lambda m: m["files"].update({"model.so": {"bytes": os.path.getsize(art / "model.so"), "sha256": "0"}})
    )
    with pytest.raises(ArtifactError, match="checksum mismatch for model.so"):
        kiln.load(str(art))
    assert not mark.exists()


@pytest.mark.parametrize(
    "name, message",
    [
        ("../outside.bin", "leaves the artifact directory"),
        ("/dev/zero", "not a relative file name"),
        ("tokenizer/../../x", "leaves the artifact directory"),
        ("zero-link", "is a symbolic link"),
        ("fifo", "not a regular file"),
    ],
)
def test_listed_names_are_confined_to_regular_files_in_the_artifact(art, name, message):
    (art.parent / "outside.bin").write_bytes(b"x")
    os.symlink("/dev/zero", art / "zero-link")
    os.mkfifo(art / "fifo")
    _rewrite(art, lambda m: m["files"].update({name: {"bytes": 0, "sha256": "0"}}))
    with pytest.raises(ArtifactError, match=message):
        kiln.load(str(art))
    os.unlink(art / "weights.safetensors")
    os.symlink("/dev/zero", art / "weights.safetensors")  # a listed file replaced by a link
    _rewrite(art, lambda m: m["files"].pop(name))
    with pytest.raises(ArtifactError, match="weights.safetensors is a symbolic link"):
        kiln.load(str(art))


def test_unlisted_tokenizer_files_are_refused(art):
    (art / "tokenizer").mkdir()
    (art / "tokenizer" / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(ArtifactError, match="tokenizer/chat_template.jinja is in the artifact but not in its manifest"):
        kiln.load(str(art))


def test_inspect_verify_reports_every_check(art, capsys):
    assert cli(["inspect", str(art), "--verify"]) == 0
    assert "- model.so: ok" in capsys.readouterr().out
    w = art / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    (art / "report.md").write_text("changed")
    assert cli(["inspect", str(art), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "- model.so: ok" in out and "- manifest.sha256: ok" in out
    assert (
        "- weights.safetensors: FAILED: checksum mismatch" in out
        and "- report.md: FAILED: report.md has 7 bytes" in out
    )
    assert "2 check(s) failed" in out


def test_the_chat_template_is_sandboxed(tmp_path):
    from tokenizers import Tokenizer, models

    from kiln.runtime.tokenizer import Tokenizer as KilnTokenizer

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    mark = tmp_path / "template-ran-code"
    (tmp_path / "chat_template.jinja").write_text(
        "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch " + str(mark) + "') }}"
    )
    tok = KilnTokenizer(str(tmp_path))
    with pytest.raises(ArtifactError, match="chat template tried an unsafe operation"):
        tok.apply_chat_template("hi")
    assert not mark.exists()
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    assert KilnTokenizer(str(tmp_path)).apply_chat_template("hi") == "<user>hi<a>"


# -- saves --------------------------------------------------------------------------------------------


BASE: dict = {}


@pytest.fixture(autouse=True)
def _base_manifest(artifacts):
    """What a real build's manifest holds (the report renders from it); saves below write a stand-in
    library so that a save costs no build."""
    if not BASE:
        BASE.update({k: v for k, v in read_manifest(artifacts["gpt2"]).items() if k != "files"})


def _save(path, name):
    def payload(tmp, manifest):
        with open(os.path.join(tmp, "model.so"), "wb") as f:
            f.write(name.encode() * 1000)

    write_artifact(str(path), dict(BASE, name=name), "ir", None, payload)


def _state(path):
    m = read_manifest(str(path))
    verify_files(str(path), m)
    return m["name"]


def _crash_at(path, name, where, exchange=True):
    """Save in a child process that dies (os._exit: no cleanup runs) at step `where`."""
    pid = os.fork()
    if pid == 0:  # the child: file operations only, then a hard exit
        try:
            atomic_dir.step = lambda s: os._exit(7) if s == where else None
            if not exchange:
                atomic_dir._exchange = lambda a, b: False
            _save(path, name)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize(
    "where, exchange, after",
    [
        ("filled", True, "old"),
        ("synced", True, "old"),
        ("exchanged", True, "new"),
        ("filled", False, "old"),
        ("moved-old", False, None),  # between the fallback's two renames: the next save or load puts old back
    ],
)
def test_a_crash_at_any_step_leaves_the_old_or_the_new_artifact(tmp_path, where, exchange, after):
    out = tmp_path / "a"
    _save(out, "old")
    assert _crash_at(out, "new", where, exchange) == 7
    leftovers = sorted(n for n in os.listdir(tmp_path) if n != "a")
    assert leftovers, "the killed save left its temporary directory"
    if after is None:
        with pytest.raises(ArtifactError, match=r"interrupted save left a\.old-"):
            read_manifest(str(out))
        assert atomic_dir.recover(str(out)) and _state(out) == "old"
    else:
        assert _state(out) == after
    _save(out, "third")  # the next save removes what the killed one left
    assert os.listdir(tmp_path) == ["a"] and _state(out) == "third"


def test_copies_are_never_hard_links(tmp_path):
    _save(tmp_path / "src", "x")
    copy_artifact(str(tmp_path / "src"), str(tmp_path / "dst"))
    for n in ("model.so", "manifest.json"):
        a, b = os.stat(tmp_path / "src" / n), os.stat(tmp_path / "dst" / n)
        assert a.st_ino != b.st_ino and b.st_nlink == 1
    with open(tmp_path / "dst" / "model.so", "ab") as f:
        f.write(b"edit")
    assert _state(tmp_path / "src") == "x"
