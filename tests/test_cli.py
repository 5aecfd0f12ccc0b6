"""The command line that helps: progress of long passes through `logging`, -q/-v, no TVM chatter on stderr,
`kiln inspect --plot`, and the optional `plots` extra's clear error."""

import io
import logging
import os
import subprocess
import sys

import pytest
import torch

from kiln.cli import main
from kiln.cli_log import StepHandler
from kiln.log import forwarded, get, step
from kiln.passmgr import run_pipeline

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def kiln_logs():
    """Records of the "kiln" logger at INFO, with its level and handlers put back afterwards."""
    root = logging.getLogger("kiln")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    h, level, prop = Keep(), root.level, root.propagate
    root.addHandler(h)
    root.setLevel(logging.INFO)
    yield records
    root.removeHandler(h)
    root.setLevel(level)
    root.propagate = prop


def _steps(records, logger):
    return [r.kiln_step for r in records if r.name == logger and hasattr(r, "kiln_step")]


@pytest.mark.parametrize("tty", [True, False])
def test_steps_redraw_one_line_on_a_tty_and_thin_out_elsewhere(tty):
    lg = get("test_cli")
    buf = io.StringIO()
    h = StepHandler(buf, tty=tty)
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        for i in range(1, 51):
            step(lg, "layer", i, 50)
        lg.info("done")
    finally:
        lg.removeHandler(h)
        lg.propagate = True
    out = buf.getvalue()
    assert "layer 50/50" in out and out.endswith("done\n")
    if tty:  # 50 redraws of one line, then a newline keeps it above the next message
        assert out.count("\r\033[K") == 50 and out.count("\n") == 2
    else:  # a log file gets the first and the last step (the loop took well under STEP_EVERY_S)
        assert "\r" not in out and out.count("\n") == 3 and "layer 1/50" in out


def test_awq_logs_every_layer_and_calibration_window(traced, kiln_logs):
    g, _ = run_pipeline(traced["llama"], "canonicalize,fuse-norms,fuse-rope,fuse-attention")
    g.meta["calib_tokens"] = [torch.randint(0, 97, (24,)).tolist() for _ in range(3)]
    run_pipeline(g, "quantize-weights{scheme=int4_g32,method=awq}")
    q = _steps(kiln_logs, "kiln.quant")
    layers = [s for s in q if s[2].startswith("awq: quantizing")]
    assert [s[0] for s in layers] == list(range(1, 16)) and layers[-1][1] == 15  # 2 x 7 linears + the head
    assert any(s[2].startswith("awq: scales") for s in q)
    assert _steps(kiln_logs, "kiln.calib")[-1][:2] == (3, 3)
    assert _steps(kiln_logs, "kiln.passes")[-1] == (1, 1, "pass quantize-weights")


def test_distillation_logs_each_step_with_its_loss(traced, kiln_logs):
    import kiln

    g, _ = run_pipeline(traced["llama"], "canonicalize,fuse-norms,fuse-rope,fuse-attention,fuse-mlp")
    kiln.distill(g, g.copy(), torch.randint(0, 97, (400,)).tolist(), steps=3, seq_len=16, batch=2)
    st = _steps(kiln_logs, "kiln.distill")
    assert [s[:2] for s in st] == [(1, 3), (2, 3), (3, 3)] and "loss" in st[0][2]


def test_progress_callback_and_logging_are_one_stream(traced):
    """kiln.compile's `progress=` hears what the logger says, even with logging left unconfigured."""
    got: list[str] = []
    before = logging.getLogger("kiln").level
    with forwarded(got.append):
        run_pipeline(traced["llama"], "canonicalize")
    assert got == ["pass canonicalize 1/1"]
    assert logging.getLogger("kiln").level == before
    got.clear()
    run_pipeline(traced["llama"], "canonicalize")  # outside: the callback is gone
    assert got == []


def test_progress_callback_leaves_the_users_own_handlers_at_their_level(traced):
    """As after `logging.basicConfig(level=WARNING)`: a root handler of any level, the root logger at WARNING."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    top, h = logging.getLogger(), Keep()
    level = top.level
    top.addHandler(h)
    top.setLevel(logging.WARNING)
    got: list[str] = []
    try:
        with forwarded(got.append):
            run_pipeline(traced["llama"], "canonicalize")
            get("test_cli").warning("a warning")
    finally:
        top.removeHandler(h)
        top.setLevel(level)
    assert "pass canonicalize 1/1" in got and "a warning" in got
    assert [m for m in seen if "canonicalize" in m or "warning" in m] == ["a warning"]


def test_compile_progress_callback_hears_phases_and_pass_steps(models):
    import kiln
    from kiln.errors import KilnError

    got: list[str] = []
    with pytest.raises(KilnError, match="no kv-cache pass"):  # fails after the passes, before the slow build
        kiln.compile(models["gpt2"], passes="canonicalize", progress=got.append)
    assert got[0].startswith("tracing") and "pass canonicalize 1/1" in got


def test_the_python_api_is_silent_until_logging_is_configured():
    code = "from kiln.log import get, step; lg = get('build'); step(lg, 'layer', 1, 2); lg.info('phase')"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and quiet.stderr == ""
    on = "import logging; logging.basicConfig(level=logging.INFO); " + code
    loud = subprocess.run([sys.executable, "-c", on], capture_output=True, text=True, timeout=60)
    assert "INFO:kiln.build:layer 1/2" in loud.stderr and "INFO:kiln.build:phase" in loud.stderr


@pytest.fixture(scope="module")
def cli_build(models, tmp_path_factory):
    """`kiln build` of a tiny transformers folder, with its own build cache; (folder, artifact, stderr)."""
    root = tmp_path_factory.mktemp("cli")
    folder = str(root / "tiny")
    models["llama"].save_pretrained(folder)
    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_CACHE", str(root / "cache"))
    yield folder, str(root / "art"), mp
    mp.undo()


def test_cli_build_shows_phases_and_steps_and_no_tvm_warnings(cli_build, capfd):
    folder, out, _ = cli_build
    assert main(["build", folder, "-o", out]) == 0
    o, e = capfd.readouterr()
    assert o.strip().endswith("art")
    assert "Fast mode" not in e  # TVM's take warning (C++ stderr): embeddings lower in clip mode
    lines = [ln for ln in e.splitlines() if ln.strip()]
    assert all(ln.startswith("[") for ln in lines), e  # every stderr line is kiln's own
    assert any("running passes" in ln for ln in lines) and any("pass canonicalize 1/8" in ln for ln in lines)
    # the same build again, quiet: served from the cache, nothing on stderr, the path on stdout
    assert main(["-q", "build", folder, "-o", out + "2"]) == 0
    o, e = capfd.readouterr()
    assert e == "" and o.strip().endswith("art2")


def test_inspect_plot_writes_a_png(cli_build, tmp_path, capfd):
    _, out, _ = cli_build
    if not os.path.exists(out):
        assert main(["-q", "build", cli_build[0], "-o", out]) == 0
    png = tmp_path / "a.png"
    assert main(["inspect", out, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    assert "plot written to" in capfd.readouterr().err


def test_plots_without_matplotlib_name_the_extra(cli_build, tmp_path, monkeypatch, capfd):
    _, out, _ = cli_build
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it raises
    assert main(["-q", "inspect", out, "--plot", str(tmp_path / "b.png")]) == 1
    assert "pip install 'kiln[plots]'" in capfd.readouterr().err


def test_cli_build_tensor_parallel_writes_every_rank(cli_build, capfd):
    """`--tensor-parallel 3` (the tiny model's 6 query / 3 KV heads split three ways): rank 0 at the top with
    the others under ranks/; the engine opens it as one group of 3 processes."""
    import json

    from kiln.runtime.engine import Engine

    folder, out, _ = cli_build
    assert main(["-q", "build", folder, "-o", out + "-tp3", "--tensor-parallel", "3"]) == 0
    top = json.load(open(os.path.join(out + "-tp3", "manifest.json")))
    assert top["tensor_parallel"]["members"] == ["", "ranks/1", "ranks/2"]
    with Engine(out + "-tp3", kv_cache_tokens=64) as eng:
        assert len(eng.group.procs) == 2 and eng.decode([1], [0], [[0]]).shape == (1, eng.vocab_size)
    with pytest.raises(SystemExit):
        main(["-q", "build", folder, "-o", out + "-tpx", "--tensor-parallel", "x"])
