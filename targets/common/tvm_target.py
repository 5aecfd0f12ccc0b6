"""`TvmTarget`: what the targets built with TVM share — lowering, `tvm.compile`, weight packing and the
manifest fields of a TVM artifact (library, weight fields, kernels, KV-cache storage)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import tvm

from kiln.entry import EntryPoint, default_entry_points
from kiln.ir import Graph
from kiln.targets.base import BuildResult, PackageInputs, Target

from .layouts import pack_fields, parse_layout
from .relax import RelaxLowering


class TvmTarget(Target):
    """A target that lowers through `lowering` (a RelaxLowering subclass) and builds with TVM."""

    lowering: ClassVar[type[RelaxLowering]] = RelaxLowering

    def tvm_target(self) -> tvm.target.Target:
        raise NotImplementedError

    def entry_points(self, graph: Graph) -> dict[str, EntryPoint]:
        """The functions to build: the graph's own (kv-cache declares them); a target may add more."""
        return dict(graph.meta.get("entry_points") or default_entry_points())

    def make_lowering(self, graph: Graph) -> RelaxLowering:
        return self.lowering(graph, self.name)

    def compile_module(self, mod: tvm.IRModule) -> Any:
        return tvm.compile(mod, target=self.tvm_target())

    def build(self, graph: Graph, entry_points: dict[str, EntryPoint] | None = None) -> BuildResult:
        """Lower and compile `graph`: its entry points (or only those given, e.g. to build faster)."""
        t0 = time.perf_counter()
        low = self.make_lowering(graph)
        mod = low.lower(entry_points or self.entry_points(graph))
        t1 = time.perf_counter()
        ex = self.compile_module(mod)
        t2 = time.perf_counter()
        return BuildResult(
            ex,
            low.weight_specs,
            self.describe(),
            {"lower": t1 - t0, "tvm_build": t2 - t1},
            sorted(gv.name_hint for gv in low.kernels.values()),
        )

    def package(self, graph: Graph, inputs: PackageInputs) -> Any:
        from kiln.artifact import Artifact, kv_summary

        timings = dict(inputs.timings)
        build = self.build(graph)
        timings["lower"] = build.timings["lower"]
        timings["tvm_build"] = build.timings["tvm_build"]
        t = time.perf_counter()
        weights = pack_fields(build.weight_specs, graph.params) if inputs.pack_weights else {}
        storage = compress_sparse(weights, build.weight_specs, graph.meta.get("sparsity"))
        timings["pack_weights"] = time.perf_counter() - t
        m = dict(inputs.manifest)
        m["tvm_version"] = tvm.__version__
        m["target"] = build.target
        m["kv_cache"] = kv_summary(m["kv_cache"], build.target.get("kv_cache_dtype"))
        m["weights"] = [
            dict(s.to_json(), **({"storage": storage[s.name]} if s.name in storage else {}), **_dense_bytes(s))
            for s in build.weight_specs
        ]
        m["weight_bytes"] = (
            int(sum(a.nbytes for a in weights.values()))
            if inputs.pack_weights
            else int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in build.weight_specs))
        )
        m["weights_included"] = bool(inputs.pack_weights)
        m["kernels"] = build.kernels
        return Artifact(
            build, weights, m, str(graph), inputs.tokenizer_dir, {k: round(v, 3) for k, v in timings.items()}
        )


def _dense_bytes(s: Any) -> dict[str, int]:
    """{"dense_bytes": n} for a field in a compressed layout (what the dense layout would hold), else {}."""
    lay = parse_layout(s.transform)
    return {"dense_bytes": lay.dense_bytes(s.shape, s.dtype)} if lay.compressed else {}


def compress_sparse(weights: dict[str, np.ndarray], specs: list, sparsity: dict | None) -> dict[str, Any]:
    """Store fields made only of sparsified parameters compactly (see kiln.runtime.sparse); the runtime
    expands them at load. Returns {field: storage record}; `weights` is rewritten in place."""
    params = (sparsity or {}).get("params", {})
    out: dict[str, Any] = {}
    if not params:
        return out
    from kiln.runtime.sparse import compress

    for s in specs:
        patterns = {params.get(src) for src in s.sources}
        if len(patterns) != 1 or None in patterns or parse_layout(s.transform).compressed:
            continue
        packed = compress(weights[s.name], patterns.pop())
        if packed is not None:
            arrays, out[s.name] = packed
            del weights[s.name]
            weights.update({s.name + k: v for k, v in arrays.items()})
    return out
