"""Pipelines as data: named pipelines, the text form of a pass list, placing added passes by phase, and
checking a pipeline against what its passes declare (parameters, required passes) before it runs.

Where a pass goes and what it needs is declared where the pass is registered (`kiln.passes.register`);
nothing here knows pass names, so a new pass needs no edit in this file.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import PassError

Step = tuple[str, dict[str, Any]]

# Pipelines are data; a name expands to its pass list.
PIPELINES: dict[str, str] = {
    # The minimum that runs: attention recognized so the KV cache can be derived.
    "O0": "canonicalize,fuse-attention,kv-cache,canonicalize",
    # Recognize the LLM-level ops that the targets have fused kernels for.
    "O1": "canonicalize,fuse-norms,fuse-rope,fuse-attention,fuse-mlp,fuse-moe,kv-cache,canonicalize",
}


_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def _refuse(spec: str, at: int, what: str, fix: str) -> PassError:
    return PassError(f"pipeline {spec!r}: {what} at position {at} ({spec[:at]!r} <here> {spec[at:]!r}); {fix}")


def parse_pipeline(spec: str) -> list[Step]:
    """'canonicalize,kv-cache{page_size=16},O1' -> [(name, params), ...] with pipelines expanded.

    The whole text must parse: passes separated by commas, each a name with an optional {key=value,...}.
    Anything else (a space or another separator between names, an unclosed brace, an empty item) is
    refused with its position, never skipped: a skipped pass is a silently different build."""
    if not isinstance(spec, str):
        raise PassError(f"a pipeline is text like 'canonicalize,fuse-norms,kv-cache', got {type(spec).__name__}")
    out: list[Step] = []
    i, n = 0, len(spec)
    while True:
        while i < n and spec[i].isspace():
            i += 1
        m = _NAME.match(spec, i)
        if m is None:
            what = "end of text" if i >= n else f"unexpected {spec[i]!r}"
            raise _refuse(spec, i, f"{what} where a pass name should be", "write pass names separated by commas")
        name, i = m.group(0), m.end()
        params = None
        if i < n and spec[i] == "{":
            close = spec.find("}", i)
            if close < 0:
                raise _refuse(spec, i, "'{' is never closed", "close the parameters with '}'")
            params, i = spec[i + 1 : close], close + 1
            if "{" in params:
                raise _refuse(spec, i, "nested '{'", "parameters are flat key=value pairs")
        while i < n and spec[i].isspace():
            i += 1
        if i < n and spec[i] != ",":
            fix = (
                f"separate passes with commas: '{name},{spec[i:].split()[0]}'"
                if _NAME.match(spec, i)
                else "separate passes with commas"
            )
            raise _refuse(spec, i, f"unexpected {spec[i]!r} after '{name}'", fix)
        out.extend(_step(name, params))
        if i >= n:
            break
        i += 1  # the comma; an item must follow it
    return out


def _step(name: str, params: str | None) -> list[Step]:
    if name in PIPELINES:
        if params is not None:
            raise PassError(f"pipeline '{name}' takes no parameters")
        return parse_pipeline(PIPELINES[name])
    kv: dict[str, Any] = {}
    for item in (params or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise PassError(f"pass parameter '{item.strip()}' of '{name}' must be key=value")
        k, v = item.split("=", 1)
        if not k.strip():
            raise PassError(f"pass parameter '{item.strip()}' of '{name}' has no key: write key=value")
        kv[k.strip()] = parse_value(v.strip())
    return [(name, kv)]


def format_pipeline(steps: Sequence[Step]) -> str:
    """The inverse of parse_pipeline (named pipelines come back expanded)."""
    return ",".join(n + ("{" + ",".join(f"{k}={v}" for k, v in p.items()) + "}" if p else "") for n, p in steps)


def parse_value(v: str) -> Any:
    """A parameter's text as the pass receives it: int, float, bool, else the string itself."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def _registry() -> dict:
    # imported when first needed: kiln.passes imports every pass (and torch) as it registers them
    from kiln.passes import REGISTRY

    return REGISTRY


def phase_of(name: str) -> str | None:
    """The phase pass `name` declared (None for passes that run anywhere, and for unknown names)."""
    info = _registry().get(name)
    return info.phase if info is not None else None


def insert_passes(pipeline: str | Sequence[Step], steps: Iterable[Step]) -> str:
    """Add `steps` to `pipeline` by their declared phases: each goes before the first pass of a later
    phase (at the end when none follows), after the passes of its own phase already there, so steps of
    one phase keep the order given. Passes without a phase (canonicalize) run wherever they are written
    and are not placed."""
    from kiln.passes import PHASES

    rank = {p: i for i, p in enumerate(PHASES)}
    out = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    for name, params in steps:
        _check_known(name)
        phase = phase_of(name)
        if phase is None:
            raise PassError(
                f"pass '{name}' has no phase, so it has no place of its own: write it into the "
                f"pipeline where it should run"
            )
        later = [i for i, (n, _) in enumerate(out) if (p := phase_of(n)) is not None and rank[p] > rank[phase]]
        out.insert(later[0] if later else len(out), (name, params))
    return format_pipeline(out)


def check_pipeline(steps: Sequence[Step], history: Sequence[str] = ()) -> None:
    """Refuse a pipeline before anything runs: unknown passes, parameters a pass does not take (or
    needs and does not get), and a pass whose required pass has not run before it, or whose result a
    later pass has replaced. `history`: the passes the graph has been through already."""
    for name, _ in steps:
        _check_known(name)
    for name, params in steps:
        check_params(name, params)
    registry = _registry()
    replaced: dict[str, str | None] = {}  # pass that ran -> the pass that replaced its result (None: it holds)
    for i, name in enumerate([*history, *(n for n, _ in steps)]):
        info = registry.get(name)
        if info is None:  # a pass of the graph's history that this process has not registered
            continue
        if i >= len(history):
            for req in info.requires:
                if req not in replaced:
                    done = [n for n, _ in steps[: i - len(history)]]
                    ran = f" (before it: {', '.join(done)})" if done else ""
                    raise PassError(
                        f"pass '{name}' requires '{req}', which has not run on this graph{ran}: add "
                        f"{req} before {name} in the pipeline"
                    )
                if replaced[req] is not None:
                    raise PassError(
                        f"pass '{name}' requires '{req}', but '{replaced[req]}' has since replaced "
                        f"what {req} made: place {name} before {replaced[req]}"
                    )
        replaced[name] = None
        for gone in info.invalidates:
            if gone in replaced:
                replaced[gone] = name


def check_params(name: str, params: dict[str, Any]) -> None:
    """Refuse parameters that pass `name`'s function does not take, and ones it needs but did not get."""
    named, any_keyword = _registry()[name].parameters()
    accepted = f"{name} accepts {', '.join(named)}" if named else f"{name} takes no parameters"
    for k in params:
        if k not in named and not any_keyword:
            raise PassError(f"pass '{name}' has no parameter '{k}'; {accepted}")
    for k, required in named.items():
        if required and k not in params:
            raise PassError(f"pass '{name}' needs parameter '{k}' ({name}{{{k}=...}}); {accepted}")


def _check_known(name: str) -> None:
    registry = _registry()
    if name not in registry:
        close = difflib.get_close_matches(name, [*registry, *PIPELINES], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise PassError(
            f"unknown pass '{name}'; {hint}known passes: {', '.join(sorted(registry))}; "
            f"pipelines: {', '.join(PIPELINES)}"
        )
