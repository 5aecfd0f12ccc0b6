"""kiln: an ahead-of-time compiler for LLM inference.

    import kiln
    art = kiln.compile("smollm2-135m", target="cpu", passes="O1")
    art.save("out/smollm2")
    engine = kiln.load("out/smollm2")
    print(engine.generate(["Hello"], kiln.SamplingParams(max_tokens=16))[0].text)

The compiler (`compile`) needs torch and TVM's compiler; `load` and `kiln.runtime` need only TVM's
runtime, numpy and safetensors, so attributes are imported lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "compile": ("kiln.api", "compile"),
    "load": ("kiln.api", "load"),
    "cached_build": ("kiln.api", "cached_build"),
    "tune": ("kiln.tuning", "tune"),
    "trace": ("kiln.trace", "trace"),
    "run_pipeline": ("kiln.passmgr", "run_pipeline"),
    "Graph": ("kiln.ir", "Graph"),
    "SamplingParams": ("kiln.runtime.sampling", "SamplingParams"),
    "Engine": ("kiln.runtime.engine", "Engine"),
    "KilnError": ("kiln.errors", "KilnError"),
    "ArtifactError": ("kiln.runtime.artifact", "ArtifactError"),
    "distill": ("kiln.distill", "distill"),
    "DistillResult": ("kiln.distill", "DistillResult"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'kiln' has no attribute '{name}'")


__all__ = list(_LAZY)
