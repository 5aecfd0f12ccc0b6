"""The `mlir` target: optimized kiln IR -> a functional PyTorch program -> MLIR through torch-mlir.

Many accelerators consume MLIR. This target hands them the model *after* kiln's passes (fused
`rms_norm`, `rope`, `gated_mlp`, paged `cached_attention`, quantized `qweight` weights):

1. `to_torch_module(graph)` rebuilds the optimized graph as an `nn.Module` whose `prefill` / `decode`
   run the IR op by op with the torch reference implementations of `kiln.ops` (parameters are
   registered buffers, never inlined). It is *functional*: MLIR tensors are values, so each entry point
   returns the updated KV caches instead of writing them in place.
2. `export_mlir(graph, out_dir, forms)` exports each entry point with `torch.export` (symbolic batch /
   tokens / pages / max_pages) and imports it with torch-mlir's FX importer into each requested output
   form. Weights are trailing *function arguments* (never constants); they are saved to
   `weights.safetensors` and the argument order is returned (and written to `entry_points.json`).
3. `RefBackend` compiles a `linalg-on-tensors` module with torch-mlir's reference lowering
   (MLIR -> LLVM, ExecutionEngine) so the exported MLIR itself can be checked numerically.

Ops with no clean MLIR form are lowered to standard ops, and each lowering is reported in `notes`:
`qweight` -> dequantize `(codes.float() - zeros) * scales` feeding a plain matmul; `cached_attention`
-> a functional paged append (`index_put` into the cache, padding rows sent to a scratch page that is
then dropped) followed by a gather of each sequence's pages through the page table and masked
attention (causal / sliding window, GQA by repeating KV heads).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from kiln.errors import KilnError, UnsupportedOpError
from kiln.ir import Graph, Node

from .program import (
    ENTRY_POINTS,
    KilnProgram,
    _buffer_name,
    _Ctx,
    _Entry,
    dequantize,
    paged_append,
    paged_attention,
    to_torch_module,
)

SUPPORTED_FORMS: tuple[str, ...] = ("torch", "linalg-on-tensors", "tosa", "stablehlo")
WEIGHTS_FILE = "weights.safetensors"
SIGNATURES_FILE = "entry_points.json"

NOTE_QWEIGHT = (
    "qweight (packed integer codes) has no MLIR form: lowered to dequantize "
    "(codes.float() - zeros) * scales (per group) followed by a plain fp32 matmul; codes stay "
    "uint8 function arguments"
)
NOTE_CACHED_ATTENTION = (
    "cached_attention (paged) has no MLIR form: lowered to a functional paged append "
    "(index_put of k/v into a copy of the cache; padding tokens write a scratch page that is "
    "dropped), a gather of each sequence's pages through page_table into a contiguous K/V "
    "[batch, kv_heads, max_pages*page_size, head_dim], and masked softmax attention "
    "(causal{window}; GQA by repeat_interleave of KV heads); the updated caches are returned "
    "as extra results instead of being written in place"
)
NOTE_WEIGHTS = (
    "weights are function arguments after the KV caches (see entry_points[...]['args']), stored in "
    "weights.safetensors under their kiln parameter names; nothing is inlined as a constant"
)


class MlirFormError(UnsupportedOpError):
    """An MLIR output form cannot express a kiln op (after kiln's own lowering to torch ops)."""

    def __init__(
        self,
        op: str,
        form: str,
        node: str | None = None,
        source: str | None = None,
        detail: str = "",
        hint: str | None = None,
    ) -> None:
        self.form, self.node = form, node
        hint = hint or (
            f"torch-mlir cannot lower kiln op '{op}'{f' (%{node})' if node else ''} to the '{form}' form. "
            f"Use another form (supported: {', '.join(SUPPORTED_FORMS)}), e.g. linalg-on-tensors, or drop the "
            f"pass that creates '{op}' from the pipeline"
        )
        super().__init__(op, source, detail, hint)


# -- export -----------------------------------------------------------------------------------


def _example(program: KilnProgram, entry: str, static: dict[str, int] | None = None) -> tuple[tuple, dict | None]:
    """Example arguments and dynamic shapes of one entry point. Dynamic: sizes chosen distinct and > 1 so
    nothing specializes. `static` ({batch, tokens, max_pages, pages}) fixes every size instead."""
    from torch.export import Dim

    page = int(program.graph.meta["kv_cache"]["page_size"])
    bind = program.entry_points[entry]
    sizes = {"batch": 3, "tokens": 5, "max_pages": 3, "pages": 11, **(static or {}), **bind}
    batch, tokens, max_pages, pages = sizes["batch"], sizes["tokens"], sizes["max_pages"], sizes["pages"]
    ids = torch.zeros(batch, tokens, dtype=torch.int64)
    start = 0 if tokens > 1 else page + 1
    pos = (torch.arange(tokens, dtype=torch.int32) + start)[None].repeat(batch, 1) % (max_pages * page)
    pt = torch.arange(batch * max_pages, dtype=torch.int32).reshape(batch, max_pages) % pages
    caches = tuple(program.empty_caches(pages))
    weights = tuple(getattr(program, _buffer_name(n)) for n in program.weight_order())
    if static is not None:
        return (ids, pos, pt, caches, weights), None
    P, MP = Dim("pages", min=2), Dim("max_pages", min=2)
    seq = {0: Dim("batch", min=2)} if "batch" not in bind else {}
    if "tokens" not in bind:
        seq[1] = Dim("tokens", min=2)
    pt_dyn = {**({0: seq[0]} if 0 in seq else {}), 1: MP}
    dyn = {
        "input_ids": dict(seq),
        "positions": dict(seq),
        "page_table": pt_dyn,
        "kv_caches": tuple({0: P} for _ in caches),
        "weights": tuple(None for _ in weights),
    }
    return (ids, pos, pt, caches, weights), dyn


def export_program(
    program: KilnProgram, entry: str, static: dict[str, int] | None = None
) -> torch.export.ExportedProgram:
    """torch.export of one entry point: symbolic batch/tokens, pages and max_pages (or `static` sizes)."""
    args, dyn = _example(program, entry, static)
    with torch.no_grad():
        return torch.export.export(_Entry(program, entry), args, dynamic_shapes=dyn, strict=False)


class _LoweringFailed(Exception):
    def __init__(self, diagnostics: str, cause: Exception) -> None:
        self.diagnostics = diagnostics
        super().__init__(f"{cause}\n{diagnostics}")


class _Diagnostics:
    """Capture what MLIR prints on fd 2 (C++ diagnostics) while lowering; re-raise as `_LoweringFailed`."""

    def __enter__(self) -> _Diagnostics:
        import sys
        import tempfile

        self.tmp = tempfile.TemporaryFile()
        sys.stderr.flush()
        self.saved = os.dup(2)
        os.dup2(self.tmp.fileno(), 2)
        return self

    def __exit__(self, et, e, tb) -> None:
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        text = self.tmp.read().decode(errors="replace")
        self.tmp.close()
        if e is not None and not isinstance(e, _LoweringFailed) and isinstance(e, Exception):
            raise _LoweringFailed(text, e) from e


def _import_torch(ep: torch.export.ExportedProgram, func_name: str):
    """FX import (with torch-mlir's decompositions) and the torch-backend pipeline: the `torch` form."""
    from torch_mlir import fx

    with _Diagnostics():
        return fx.export_and_import(ep, output_type="torch", func_name=func_name)


def _to_form(torch_module, form: str):
    """Lower a `torch`-form module to `form` (on a copy; the input stays usable for other forms)."""
    from torch_mlir import ir
    from torch_mlir.compiler_utils import OutputType, lower_mlir_module

    if form == "torch":
        return torch_module
    with _Diagnostics():
        with torch_module.context:
            copy = ir.Module.parse(torch_module.operation.get_asm())
        return lower_mlir_module(False, OutputType.get(form), copy)


def _lower(ep: torch.export.ExportedProgram, form: str, func_name: str):
    """torch-mlir FX import + lowering to `form`; failures raise `_LoweringFailed` with the diagnostics."""
    return _to_form(_import_torch(ep, func_name), form)


def check_forms(forms: Sequence[str]) -> list[str]:
    """The forms, validated: a KilnError names an unknown one (call before the slow steps)."""
    forms = list(forms)
    bad = [f for f in forms if f not in SUPPORTED_FORMS]
    if bad or not forms:
        raise KilnError(f"unknown MLIR form(s) {bad or forms}: choose from {', '.join(SUPPORTED_FORMS)}")
    return forms


def _signature(program: KilnProgram, entry: str, static: dict[str, int] | None = None) -> dict[str, Any]:
    g = program.graph
    bind = {**(static or {}), **program.entry_points[entry]}
    args = []
    for n in g.inputs:
        shape = [str(int(bind[d.name])) if d.is_Symbol and d.name in bind else str(d) for d in n.type.shape]
        args.append(
            {
                "name": n.name,
                "kind": "kv_cache" if n.name in program.cache_names else "input",
                "shape": shape,
                "dtype": n.type.dtype,
            }
        )
    for name in program.weight_order():
        t = g.params[name]
        args.append(
            {"name": name, "kind": "weight", "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        )
    res = [
        {
            "name": "logits",
            "shape": [
                str(int(bind[d.name])) if d.is_Symbol and d.name in bind else str(d) for d in g.outputs[0].type.shape
            ],
            "dtype": g.outputs[0].type.dtype,
        }
    ]
    res += [{"name": "new_" + c, "kind": "kv_cache"} for c in program.cache_names]
    return {
        "args": args,
        "results": res,
        "bind": program.entry_points[entry],
        "weights_from": f"{WEIGHTS_FILE}: argument i with kind=weight is the tensor named args[i].name",
    }


def lowering_notes(graph: Graph) -> list[str]:
    """What the mlir target lowers on its own (ops with no clean MLIR form)."""
    notes = [NOTE_WEIGHTS]
    ca = graph.find("cached_attention")
    if ca:
        windows = sorted({int(n.attrs["window"]) for n in ca} - {0})
        notes.append(NOTE_CACHED_ATTENTION.format(window=f" + sliding window {windows}" if windows else ""))
        if any(n.attrs["kv_dtype"] for n in ca):
            notes.append("quantized KV cache: stored as fp32 holding the dequantized 8-bit values (fake quant)")
    if graph.find("qweight"):
        schemes = sorted({n.attrs["scheme"] for n in graph.find("qweight")})
        notes.append(NOTE_QWEIGHT + f" (schemes: {', '.join(schemes)})")
    if graph.find("quant_act"):
        notes.append("quant_act lowered to round/clamp fake quantization in fp32")
    return notes


def export_mlir(
    graph: Graph,
    out_dir: str,
    forms: Sequence[str] = ("linalg-on-tensors",),
    entry_points: Sequence[str] = ENTRY_POINTS,
    static_shapes: dict[str, int] | None = None,
    probe_on_failure: bool = True,
) -> dict[str, Any]:
    """Export the optimized `graph` to MLIR, one file per entry point and form.

    Writes `<entry>.<form>.mlir` for each entry point and form, `weights.safetensors` (tensors under their
    kiln parameter names) and `entry_points.json`. Functions take `(input_ids, positions, page_table,
    kv_cache_0..L-1, *weights)` and return `(logits, *new_kv_caches)`; sizes are symbolic unless
    `static_shapes` ({"batch", "tokens", "max_pages", "pages"}) fixes them (the `tosa` form needs that).

    Returns {"files": {"<entry>.<form>": path, "weights": path, "entry_points": path},
    "entry_points": {entry: {"args": [...], "results": [...], "bind": {...}}}, "forms": [...],
    "notes": [...]}. A form that cannot express a kiln op raises `MlirFormError` naming the op and form."""
    from safetensors.torch import save_file

    forms = check_forms(forms)
    program = to_torch_module(graph)
    os.makedirs(out_dir, exist_ok=True)
    files: dict[str, str] = {}
    sigs: dict[str, Any] = {}
    for entry in entry_points:
        if entry not in program.entry_points:
            raise KilnError(f"graph has no entry point '{entry}' (has {', '.join(program.entry_points)})")
        ep = export_program(program, entry, static_shapes)
        torch_module = None
        for form in forms:
            try:
                if torch_module is None:
                    torch_module = _import_torch(ep, entry)
                module = _to_form(torch_module, form)
            except _LoweringFailed as e:
                raise _explain(program, entry, form, e, static_shapes, probe_on_failure) from e
            path = os.path.join(out_dir, f"{entry}.{form}.mlir")
            with open(path, "w") as f:
                f.write(module.operation.get_asm(large_elements_limit=16))
            files[f"{entry}.{form}"] = path
        sigs[entry] = _signature(program, entry, static_shapes)
    wpath = os.path.join(out_dir, WEIGHTS_FILE)
    save_file({n: graph.params[n].detach().contiguous() for n in program.weight_order()}, wpath)
    files["weights"] = wpath
    notes = lowering_notes(graph)
    if static_shapes:
        notes.append(f"static shapes {dict(static_shapes)}: functions are specialized to these sizes")
    spath = os.path.join(out_dir, SIGNATURES_FILE)
    with open(spath, "w") as f:
        json.dump({"forms": forms, "entry_points": sigs, "notes": notes}, f, indent=1)
    files["entry_points"] = spath
    return {"files": files, "entry_points": sigs, "forms": forms, "notes": notes}


def _explain(
    program: KilnProgram, entry: str, form: str, e: _LoweringFailed, static: dict[str, int] | None, probe: bool
) -> KilnError:
    """Turn torch-mlir's failure (which names MLIR ops) into an error naming the kiln op and the form."""
    first = _first_diagnostic(e.diagnostics) or _first_diagnostic(str(e))
    culprit = probe_ops(program, form, dynamic=static is None) if probe else None
    if culprit is not None:
        node, detail = culprit
        hint = None
        if detail.endswith("(with symbolic sizes)"):
            hint = (
                f"torch-mlir cannot lower kiln op '{node.op}' (%{node.name}) to the '{form}' form over symbolic "
                "sizes: pass static_shapes={'batch': B, 'tokens': T, 'max_pages': P, 'pages': N} to export "
                "fixed sizes, or use linalg-on-tensors / stablehlo, which keep sizes symbolic"
            )
        return MlirFormError(node.op, form, node.name, node.source, detail, hint)
    if static is None and "size.int" in first:
        return MlirFormError(
            "symbolic dimensions",
            form,
            detail=first,
            hint=f"the '{form}' form cannot express symbolic sizes (batch/tokens/pages/max_pages): "
            "pass static_shapes={'batch': B, 'tokens': T, 'max_pages': P, 'pages': N} "
            "(--mlir-static on the CLI) to export fixed sizes",
        )
    return KilnError(f"torch-mlir failed to lower entry point '{entry}' to '{form}': {first}")


def _first_diagnostic(msg: str) -> str:
    for line in msg.splitlines():
        if "error:" in line:
            return re.sub(r"^loc\([^)]*\):\s*", "", line.strip())[:400]
    lines = [l.strip() for l in msg.splitlines() if l.strip()]
    return lines[0] if lines else msg


# -- naming the kiln op a form cannot express ---------------------------------------------------------


class _OneOp(torch.nn.Module):
    def __init__(self, program: KilnProgram, node: Node, env: dict[str, Any]) -> None:
        super().__init__()
        object.__setattr__(self, "_program", program)
        self.node, self.env = node, env

    def forward(self, *x):
        env = dict(self.env)
        for n, t in zip(self.node.inputs, x):  # symbolic sizes come from the inputs, as in a full run
            for d, size in zip(n.type.shape, t.shape):
                if d.is_Symbol:
                    env[d.name] = size
        caches = {}
        if self.node.op == "cached_attention":  # the probe's own cache, passed in as an argument
            cache = self.node.input("cache")
            caches = {cache.name: x[self.node.inputs.index(cache)]}
        return self._program._op(_Ctx(env), self.node, list(x), caches, False)


def _probe_dynamic_shapes(node: Node, bind: dict[str, int]) -> tuple:
    from torch.export import Dim

    dims: dict[str, Any] = {}
    spec = []
    for n in node.inputs:
        spec.append(
            {
                i: dims.setdefault(d.name, Dim(d.name, min=2))
                for i, d in enumerate(n.type.shape)
                if d.is_Symbol and d.name not in bind
            }
            or None
        )
    return tuple(spec)


def probe_ops(program: KilnProgram, form: str, dynamic: bool = True) -> tuple[Node, str] | None:
    """Lower each distinct kiln op of the program on its own to `form` (inputs: values of an eager
    prefill; sizes symbolic when `dynamic`, as in the exported entry points). Returns the first
    (node, first diagnostic) that fails, or None."""
    g = program.graph
    bind = program.entry_points["prefill"]
    args, _ = _example(program, "prefill")
    ids, pos, pt, caches, _w = args
    env = {"batch": 1, "tokens": ids.shape[1], "pages": caches[0].shape[0] if caches else 1, "max_pages": pt.shape[1]}
    seen: set = set()
    values: dict[Node, torch.Tensor] = {}
    ins = {"input_ids": ids, "positions": pos, "page_table": pt, **dict(zip(program.cache_names, caches))}
    params = {k: getattr(program, b) for b, k in program.param_names.items()}
    ctx = _Ctx(env)
    cache_vals = dict(zip(program.cache_names, caches))
    with torch.no_grad():
        for node in g.nodes:
            if node.op == "input":
                values[node] = ins[node.name]
                continue
            if node.op == "param":
                values[node] = params[node.attrs["name"]]
                continue
            x = [values[i] for i in node.inputs]
            key = (
                node.op,
                tuple(sorted((k, repr(v)) for k, v in node.attrs.items() if k not in ("layer",))),
                tuple(t.dtype for t in x),
            )
            if key not in seen:
                seen.add(key)
                mod = _OneOp(program, node, env)
                ep = None
                if dynamic:
                    try:
                        ep = torch.export.export(
                            mod, tuple(x), dynamic_shapes=(_probe_dynamic_shapes(node, bind),), strict=False
                        )
                    except Exception:
                        ep = None
                try:
                    _lower(ep or torch.export.export(mod, tuple(x), strict=False), form, "probe")
                except Exception as e:
                    detail = _first_diagnostic(getattr(e, "diagnostics", "") or str(e))
                    return node, (detail + (" (with symbolic sizes)" if ep is not None else ""))
            ctx.node = node
            values[node] = program._op(ctx, node, x, cache_vals, False)
    return None


def torch_mlir_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-mlir")
    except PackageNotFoundError:
        return "unknown"


from .refbackend import RefBackend  # noqa: E402  (part of this module's API: export, then run)

__all__ = [
    "SUPPORTED_FORMS",
    "check_forms",
    "KilnProgram",
    "MlirFormError",
    "RefBackend",
    "dequantize",
    "export_mlir",
    "export_program",
    "lowering_notes",
    "paged_append",
    "paged_attention",
    "probe_ops",
    "to_torch_module",
]
