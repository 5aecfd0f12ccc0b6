"""The `Target` interface: what every back end declares and does.

A target is one folder under `targets/` holding a module `target.py` that defines one `Target`
subclass as `TARGET`. `get_target(name)` imports `kiln.targets.<name>.target`, so adding a target is
adding its folder: nothing in `kiln.compile`, the CLI or this file names a target.

A target
- describes itself (`describe()`: what goes into the manifest's `target` field, including what the
  deployment host must have);
- contributes passes (`pass_modules`: modules whose import registers them, e.g. pim's `place-pim`);
- lowers and builds optimized IR (`build`), registering its per-op lowering rules on the op records
  (`kiln.ops.register_rule`);
- packages the result (`package`): an object with `save(dir)`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.ir import Graph


@dataclass(frozen=True)
class WeightSpec:
    """One field of an entry point's `weights` tuple: made from graph parameters (`sources`) by its
    layout. `transform` is the layout's key (see targets/common/layouts.py), as the manifest records it."""

    name: str
    sources: tuple[str, ...]
    transform: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BuildResult:
    """What a target hands to the packager: the compiled library and how to bind weights."""

    executable: Any
    weight_specs: list[WeightSpec]
    target: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    kernels: list[str] = field(default_factory=list)
    timeline: Any = None  # a simulated timeline, for targets that simulate (pim)

    def export(self, path: str) -> None:
        self.executable.export_library(path)


@dataclass
class PackageInputs:
    """Everything `Target.package` needs besides the graph: the manifest fields common to every target
    (name, source, model, pipeline, pass records, KV cache, context, eos ids ...), and the options."""

    manifest: dict[str, Any]
    tokenizer_dir: str | None
    timings: dict[str, float]
    pack_weights: bool = True


class Target:
    """Base class of kiln's targets. Subclasses set `name`, `capabilities` and implement `build` and
    `package` (TVM targets inherit both from `targets.common.tvm_target.TvmTarget`)."""

    name: ClassVar[str] = ""
    # What the target's kernels support, checked by users and tests: "int8", "int4", "kv-int8", "w8a8",
    # "alibi", "mla", "sliding-window", "gqa", "sparse-storage", "tensor-cores", "simulated", ...
    capabilities: ClassVar[frozenset[str]] = frozenset()
    # Modules whose import registers the passes this target contributes (e.g. "place-pim").
    pass_modules: ClassVar[tuple[str, ...]] = ()

    def describe(self) -> dict[str, Any]:
        """The manifest's `target` field."""
        return {"name": self.name}

    def passes(self) -> list[str]:
        """Register and name the passes this target contributes."""
        from kiln.passes import REGISTRY

        for m in self.pass_modules:
            importlib.import_module(m)
        return sorted(n for n, p in REGISTRY.items() if p.fn.__module__ in self.pass_modules)

    def build(self, graph: Graph) -> Any:
        raise NotImplementedError

    def package(self, graph: Graph, inputs: PackageInputs) -> Any:
        """Build `graph` and return the artifact: an object with `save(dir) -> path`, its `manifest` (a dict,
        what `save` writes) and `timings` (a dict of seconds per phase, which `kiln.compile` completes)."""
        raise NotImplementedError


def available_targets() -> list[str]:
    """Target names: the folders holding a target.py on the `kiln.targets` package path (targets/, and any
    folder a user adds to `kiln.targets.__path__`)."""
    import kiln.targets

    return sorted(
        {
            d
            for root in kiln.targets.__path__
            for d in os.listdir(root)
            if os.path.exists(os.path.join(root, d, "target.py"))
        }
    )


def get_target(name: str, **options: Any) -> Target:
    """The target object for `name`, built with its options (imports TVM's compiler only when called)."""
    names = available_targets()
    if name not in names:
        raise KilnError(f"unknown target '{name}'; available targets: {', '.join(names)}")
    cls = importlib.import_module(f"kiln.targets.{name}.target").TARGET
    try:
        tgt = cls(**options)
    except TypeError as e:
        import inspect

        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise KilnError(
            f"target '{name}' does not take the options {sorted(options)} ({e}); it accepts: "
            f"{', '.join(accepted) or 'no options'}"
        ) from None
    tgt.passes()
    return tgt
