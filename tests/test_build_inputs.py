"""Build inputs that used to give a silently different build: pipelines that do not parse, contexts the
model cannot serve, and a build cache keyed by names instead of content."""

import os

import pytest

import kiln
from kiln.errors import PassError
from kiln.pass_options import pruning_steps
from kiln.pipeline import parse_pipeline


@pytest.mark.parametrize(
    "spec, where, fix",
    [
        ("canonicalize fuse-norms,kv-cache", "position 13", "'canonicalize,fuse-norms,kv-cache'"),
        ("canonicalize;kv-cache", "position 12", "separate passes with commas"),
        ("canonicalize,,kv-cache", "position 13", "pass names separated by commas"),
        ("canonicalize,kv-cache,", "position 22", "pass names separated by commas"),
        ("kv-cache{page_size=8", "position 8", "close the parameters"),
        ("kv-cache{page_size=8}x", "position 21", "separate passes with commas"),
        ("", "position 0", "pass names"),
    ],
)
def test_a_pipeline_that_does_not_parse_is_refused_with_position_and_fix(spec, where, fix):
    with pytest.raises(PassError, match=where) as e:
        parse_pipeline(spec)
    assert fix in str(e.value)


def test_the_whole_pipeline_runs_or_none_of_it(models):
    with pytest.raises(PassError, match="position 13"):
        kiln.compile(models["llama"], passes="canonicalize fuse-norms,kv-cache")
    assert parse_pipeline(" canonicalize , kv-cache{ page_size = 8 } ") == [
        ("canonicalize", {}),
        ("kv-cache", {"page_size": 8}),
    ]
    with pytest.raises(PassError, match="expected items like heads=0.2"):
        pruning_steps("heads=0.2 ffn=0.2")


@pytest.mark.parametrize(
    "ctx, message",
    [
        (0, "max_context=0: give a positive number"),
        (-4, "max_context=-4: give a positive number"),
        (2.5, "max_context=2.5"),
        (512, r"larger than the model's learned position table \(256 rows\)"),
    ],
)
def test_max_context_is_checked_against_the_model(models, ctx, message):
    with pytest.raises(kiln.KilnError, match=message):
        kiln.compile(models["gpt2"], max_context=ctx)


def test_build_cache_keys_model_and_calibration_files_by_content(tmp_path):
    from kiln.api import build_key

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"a" * 64)
    calib = tmp_path / "calib.txt"
    calib.write_text("some text")

    def key():
        return build_key(str(model), "cpu", "O1", None, {"calib": str(calib)})

    def replace_in_place(p, data):  # same size, same mtime: only the content differs
        st = os.stat(p)
        p.write_bytes(data)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))

    k0 = key()
    assert key() == k0
    replace_in_place(model / "model.safetensors", b"b" * 64)
    k1 = key()
    assert k1 != k0
    replace_in_place(calib, b"sane text")
    assert key() not in (k0, k1)
