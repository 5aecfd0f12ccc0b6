"""The Target interface: a target is a folder holding a target.py; kiln.compile, the CLI and the build cache
name no target, so a new one is found and compiled for without touching anything else."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import kiln
import kiln.targets
from kiln.errors import KilnError
from kiln.targets.base import Target, available_targets, get_target

TOY = """
import json, os

from kiln.artifact import write_artifact
from kiln.targets.base import Target


class ToyArtifact:
    def __init__(self, graph, manifest, timings):
        self.graph, self.manifest, self.timings = graph, manifest, timings

    def save(self, path):
        def payload(tmp, m):
            m["target"] = {"name": "toy", "ops": sorted({n.op for n in self.graph.nodes})}
        self.manifest = write_artifact(path, dict(self.manifest), str(self.graph), None, payload)
        return path


class ToyTarget(Target):
    name = "toy"
    capabilities = frozenset({"fp32"})

    def __init__(self, width: int = 1) -> None:
        self.width = width

    def describe(self):
        return {"name": self.name, "width": self.width}

    def package(self, graph, inputs):
        return ToyArtifact(graph, inputs.manifest, dict(inputs.timings))


TARGET = ToyTarget
"""


@pytest.fixture
def toy_target(tmp_path, monkeypatch):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "__init__.py").write_text("")
    (tmp_path / "toy" / "target.py").write_text(textwrap.dedent(TOY))
    monkeypatch.setattr(kiln.targets, "__path__", [*kiln.targets.__path__, str(tmp_path)])
    yield "toy"
    for m in ("kiln.targets.toy.target", "kiln.targets.toy"):
        sys.modules.pop(m, None)


def test_builtin_targets_are_found_by_folder():
    assert {"cpu", "cuda", "pim", "mlir"} <= set(available_targets())


def test_a_new_target_is_one_folder(toy_target, tmp_path):
    from conftest import tiny_model

    assert toy_target in available_targets()
    tgt = get_target(toy_target, width=3)
    assert isinstance(tgt, Target) and tgt.describe() == {"name": "toy", "width": 3}
    with pytest.raises(KilnError, match="accepts: width"):
        get_target(toy_target, depth=2)
    # kiln.compile traces, runs the passes and hands the result to the target's package()
    art = kiln.compile(tiny_model("llama"), target=toy_target, passes="O1")
    path = art.save(str(tmp_path / "out"))
    m = json.load(open(f"{path}/manifest.json"))
    assert m["target"]["name"] == "toy" and "cached_attention" in m["target"]["ops"]
    assert m["pipeline"] == "O1" and len(m["passes"]) == 8


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(KilnError, match="available targets: cpu, cuda, mlir, pim"):
        get_target("tpu")


def test_pim_contributes_its_pass():
    from kiln.passes import REGISTRY

    assert "place-pim" in get_target("pim").passes() and "place-pim" in REGISTRY
