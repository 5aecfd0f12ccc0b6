"""Public API: `kiln.compile(model, target, passes) -> Artifact` and `kiln.load(path) -> Engine`."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

from . import __version__ as KILN_VERSION
from .errors import KilnError
from .log import get, takes_progress

log = get("build")


@takes_progress
def compile(
    model: Any,
    target: str = "cpu",
    passes: str = "O1",
    *,
    tokenizer_dir: str | None = None,
    name: str | None = None,
    dump_ir: str | None = None,
    max_context: int | None = None,
    progress: Callable[[str], None] | None = None,
    verify_each: bool = True,
    quant: str | None = None,
    quant_method: str = "rtn",
    quant_plan: str | dict[str, str] | None = None,
    kv_quant: str | None = None,
    w8a8: bool = False,
    calib: str | list[list[int]] | None = None,
    eval_text: str | None = None,
    calib_windows: int = 8,
    eval_tokens: int = 2048,
    mlir_forms: list[str] | None = None,
    mlir_static: dict[str, int] | None = None,
    pack_weights: bool = True,
    target_options: dict[str, Any] | None = None,
    prune: str | None = None,
    sparsify: str | None = None,
    sparsify_method: str = "wanda",
    distill_steps: int = 0,
    attention: str | None = None,
    draft: str | list[str] | None = None,
    distill_options: dict[str, Any] | None = None,
    tensor_parallel: int = 1,
):
    """Compile a causal LM for `target` with the pass pipeline `passes`.

    `model` is a transformers causal LM (nn.Module), a built-in name (`smollm2-135m`, `gemma3-270m`), a GGUF file or a
    local transformers folder. Returns an `Artifact`; `artifact.save(dir)` writes it.

    Quantization: `quant="int4_g128"` (with `quant_method` rtn|awq|gptq), `kv_quant="int8"|"fp8_e4m3"`,
    `w8a8=True` insert the matching passes into the pipeline; `quant_plan` (a dict weight name -> scheme
    or "none", or a JSON file of one, as `kiln.tune` writes) mixes schemes per projection. `calib` (text
    file, or "lee") feeds calibrating methods; `eval_text` makes every lossy pass record perplexity and KL on that text.
    A model prepared with `kiln.qat.prepare` compiles with exactly its training scheme.

    `pack_weights=False` builds from shapes alone (a model on the `meta` device works): the artifact
    lists its weight fields but holds none, and `Engine(path, weights=...)` supplies them.

    Pruning: `prune="heads=0.2,ffn=0.2,layers=2"` (or pass names) and `sparsify="0.5"|"2:4"` (with
    `sparsify_method` magnitude|wanda|sparsegpt) insert the passes before fuse-mlp; `distill_steps=N`
    then runs `kiln.distill` (teacher: the model before pruning; text: the calibration text) as a
    recovery step, recorded with the passes.

    Progress goes to the logger "kiln" (INFO: phases and steps of long loops; see kiln/log.py), and to
    `progress(msg)` as well when given.

    Attention: `attention="gqa:1"` (or "mqa", "gqa:N") merges KV heads, `attention="mla:96:32"` converts to
    multi-head latent attention of rank 96 keeping 32 rotary dims per head (see passes/convert_*.py).

    Drafts for speculative decoding: `draft="self:8"` (8 layers of the model, weights shared) and/or
    `"distill:4"` (a small trained model of the same width) are built from the same model and shipped
    inside the artifact under drafts/ (see kiln/draft.py). `calib` may also be token windows
    (list of lists of ids); `distill_options` go to `kiln.distill` in the recovery step.

    `tensor_parallel=N` splits the model over N ranks (passes/shard_tensor_parallel.py); it is refused,
    before the slow steps, for a target without the "tensor-parallel" capability (today: every target).
    """
    import torch

    from kiln.targets import get_target
    from kiln.targets.base import PackageInputs

    from .models import load_model
    from .passmgr import run_pipeline
    from .trace import trace

    timings: dict[str, float] = {}
    requested = passes  # the pipeline as asked for: drafts insert their own options into it
    from .draft import parse_drafts

    drafts = parse_drafts(draft)  # a bad --draft is refused before the slow steps
    source = getattr(model, "name_or_path", None) or type(model).__name__
    t0 = time.perf_counter()
    if isinstance(model, str):
        log.info("loading %s", model)
        lm = load_model(model)
        source, model, tokenizer_dir = model, lm.model, tokenizer_dir or lm.folder
        timings["load"] = time.perf_counter() - t0
    if not isinstance(model, torch.nn.Module):
        raise KilnError(f"kiln.compile needs a torch.nn.Module or a model name/path, got {type(model).__name__}")
    if drafts:
        from .draft import check_drafts

        check_drafts(model, drafts)  # a draft as deep as the model is refused before the slow steps
    options = dict(target_options or {})
    if mlir_forms is not None:  # the mlir target's options, kept as keywords of compile
        options["forms"] = mlir_forms
    if mlir_static is not None:
        options["static"] = mlir_static
    tgt = get_target(target, **options)  # refuse bad targets and options before the slow steps
    _check_tensor_parallel(tensor_parallel, tgt)
    if drafts and tensor_parallel > 1:
        raise KilnError("--draft and --tensor-parallel together are not built yet: build one or the other")
    from .pass_options import build_pipeline
    from .qat import qat_scheme, strip_qat

    qs = qat_scheme(model)
    head = "same"
    if qs is not None:
        model = strip_qat(model)
        (quant, head), quant_method = qs, "rtn"
    # the options' passes go where their phases say (activation-aware MLA when calib is given); the
    # pipeline is checked here, before the slow trace
    passes = build_pipeline(
        passes,
        attention=attention,
        prune=prune,
        sparsify=sparsify,
        sparsify_method=sparsify_method,
        quant=quant,
        quant_method=quant_method,
        kv_quant=kv_quant,
        w8a8=w8a8,
        lm_head=head,
        quant_plan=plan_file(quant_plan) if quant_plan else None,
    )
    cfg = getattr(model, "config", None)
    from .context import resolve_max_context

    ctx = resolve_max_context(model, max_context)
    t = time.perf_counter()
    log.info("tracing with torch.export (symbolic batch and tokens)")
    graph = trace(model, max_tokens=ctx)
    timings["trace"] = time.perf_counter() - t
    if calib or eval_text:
        from .calib import read_text, windows

        if isinstance(calib, list):  # token windows given directly (a draft's self-generated text)
            graph.meta["calib_tokens"] = [list(map(int, w)) for w in calib[:calib_windows]]
        elif calib:
            tok = _tokenizer(tokenizer_dir)
            graph.meta["calib_tokens"] = windows(tok(read_text(calib))["input_ids"], 256, calib_windows)
        if eval_text:
            tok = _tokenizer(tokenizer_dir)
            graph.meta["eval_tokens"] = windows(tok(read_text(eval_text))["input_ids"], 256, max(1, eval_tokens // 256))
    t = time.perf_counter()
    log.info(f"running passes: {passes}")
    if distill_steps:
        graph, records = _run_with_recovery(
            graph, passes, int(distill_steps), verify_each, dump_ir, distill_options or {}
        )
    else:
        graph, records = run_pipeline(graph, passes, verify_each=verify_each, dump_ir=dump_ir)
    timings["passes"] = time.perf_counter() - t
    if "kv_cache" not in graph.meta:
        raise KilnError(
            f"pipeline '{passes}' has no kv-cache pass: the runtime needs prefill/decode entry points "
            "(add kv-cache after fuse-attention, or use O0/O1)"
        )
    graph.meta.pop("calib_tokens", None)
    graph.meta.pop("eval_tokens", None)
    from .artifact import kv_summary
    from .ops.moe import idle_expert_params

    def manifest_of(graph: Any, records: list) -> dict[str, Any]:
        tp = graph.meta.get("tensor_parallel")
        return {
            "schema_version": _schema(),
            "kiln_version": KILN_VERSION,
            "name": name or (cfg.model_type if cfg is not None else "model"),
            "source": str(source),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": graph.meta.get("model", {}),
            "num_params": graph.stats()["params"],
            "active_params": graph.stats()["params"] - idle_expert_params(graph),
            "trace": {
                "decomposed": graph.meta.get("decomposed", []),
                "attention_fallbacks": graph.meta.get("attention_fallbacks", []),
                "norm_fallbacks": graph.meta.get("norm_fallbacks", []),
            },
            "pipeline": passes + (f",{records[-1].name}{{ranks={tp['ranks']},rank={tp['rank']}}}" if tp else ""),
            "passes": [r.to_json() for r in records],
            "entry_points": _signatures(graph),
            "kv_cache": kv_summary(graph.meta["kv_cache"]),
            "max_context": ctx,
            "eos_token_ids": _eos_ids(cfg),
            "quantization": graph.meta.get("quant"),
            **({"tensor_parallel": tp} if tp else {}),
        }

    if tensor_parallel > 1:
        art = _package_ranks(tgt, graph, records, tensor_parallel, manifest_of, tokenizer_dir, timings, pack_weights)
    else:
        log.info(f"lowering and building for {target}")
        art = tgt.package(graph, PackageInputs(manifest_of(graph, records), tokenizer_dir, timings, pack_weights))
    if drafts:
        if not pack_weights:
            raise KilnError("--draft needs the weights in the artifact (drop --no-weights / pack_weights=False)")
        if not hasattr(art, "drafts"):
            raise KilnError(f"--draft: drafts are shipped in cpu, cuda and pim artifacts, not {target}")
        from .draft import build_drafts

        t = time.perf_counter()
        art.drafts = build_drafts(
            compile,
            model,
            drafts,
            tokenizer_dir,
            art,
            target=target,
            passes=requested,
            max_context=max_context,
            verify_each=verify_each,
            quant=quant,
            quant_method=quant_method,
            kv_quant=kv_quant,
            w8a8=w8a8,
            target_options=target_options,
            attention=attention,
        )
        art.timings["drafts"] = round(time.perf_counter() - t, 3)
    art.timings["total"] = round(time.perf_counter() - t0, 3)
    return art


def _check_tensor_parallel(ranks: Any, tgt: Any) -> None:
    """Refuse a tensor-parallel build the target cannot serve, before the slow steps."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise KilnError(f"tensor_parallel must be a number of ranks >= 1, got {ranks!r}")
    if ranks > 1 and "tensor-parallel" not in tgt.capabilities:
        raise KilnError(
            f"target '{tgt.name}' cannot build tensor_parallel={ranks}: its runtime has no rank group to run the "
            "ranks' collectives (the cpu and cuda targets do); build with tensor_parallel=1"
        )


def _package_ranks(
    tgt: Any,
    graph: Any,
    records: list,
    ranks: int,
    manifest_of: Callable[[Any, list], dict[str, Any]],
    tokenizer_dir: str | None,
    timings: dict[str, float],
    pack_weights: bool,
) -> Any:
    """A tensor-parallel build: rank R's program is shard-tensor-parallel{ranks,rank=R} of the optimized graph,
    built for the target; rank 0's artifact carries the others under ranks/R (compiler/artifact.py)."""
    from kiln.targets.base import PackageInputs

    from .passmgr import run_pipeline

    arts = []
    for r in range(ranks):
        log.info(f"rank {r} of {ranks}: sharding, lowering and building for {tgt.name}")
        g, more = run_pipeline(graph, f"shard-tensor-parallel{{ranks={ranks},rank={r}}}")
        inputs = PackageInputs(manifest_of(g, records + more), tokenizer_dir if r == 0 else None, timings, pack_weights)
        arts.append(tgt.package(g, inputs))
    arts[0].ranks = arts[1:]
    return arts[0]


def plan_file(plan: str | dict[str, str]) -> str:
    """A per-weight quantization plan as a file the pipeline text can name: a dict is written, by its
    content, under kiln's cache (the manifest records the plan itself, not this path)."""
    if isinstance(plan, str):
        if not os.path.exists(plan):
            raise KilnError(f"quantization plan {plan} does not exist (a JSON object: weight name -> scheme)")
        return os.path.abspath(plan)
    from .models import cache_dir

    text = json.dumps({str(k): str(v) for k, v in sorted(plan.items())}, indent=0)
    path = os.path.join(cache_dir(), "plans", hashlib.sha256(text.encode()).hexdigest()[:16] + ".json")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return path


def _run_with_recovery(graph, passes: str, steps: int, verify_each: bool, dump_ir, options: dict | None = None):
    """Run the pipeline with a distillation step after its last pruning/sparsity pass: the teacher is the
    graph just before the first one, the text the calibration windows."""
    from .distill import distill
    from .passmgr import PassManager, PassRecord, flops_per_token
    from .pipeline import format_pipeline, parse_pipeline, phase_of

    steps_ = parse_pipeline(passes)
    idx = [i for i, (n, _) in enumerate(steps_) if phase_of(n) == "prune"]
    if not idx:
        raise KilnError("distill_steps is a recovery step after pruning: pass prune=... or sparsify=... too")
    if "calib_tokens" not in graph.meta:
        raise KilnError("distill_steps trains on the calibration text: pass calib=... (for example calib='lee')")
    pm = PassManager(verify_each, dump_ir)
    teacher = pm.run(graph, format_pipeline(steps_[: idx[0]])) if idx[0] else graph
    student = pm.run(teacher, format_pipeline(steps_[idx[0] : idx[-1] + 1]))
    log.info(f"distillation recovery: {steps} steps")
    text = [t for w in graph.meta["calib_tokens"] for t in w]
    r = distill(teacher, student, text, steps=steps, eval_tokens=graph.meta.get("eval_tokens"), **(options or {}))
    st = r.student.stats()
    f = flops_per_token(r.student)
    evals: dict[str, float] = {}
    if r.ppl_before:
        assert r.ppl_after is not None and r.teacher_ppl is not None  # measured on the same eval windows
        evals = {
            "perplexity_before": round(r.ppl_before, 4),
            "perplexity_after": round(r.ppl_after, 4),
            "teacher_perplexity": round(r.teacher_ppl, 4),
        }
    pm.records.append(
        PassRecord(
            "distill",
            dict(r.config),
            False,
            {"steps": steps},
            st["nodes"],
            st["nodes"],
            st["param_bytes"],
            st["param_bytes"],
            f,
            f,
            r.seconds,
            {
                "loss_before": round(r.loss_before, 6),
                "loss_after": round(r.loss_after, 6),
                **evals,
            },
        )
    )
    rest = steps_[idx[-1] + 1 :]
    g = pm.run(r.student, format_pipeline(rest)) if rest else r.student
    return g, pm.records


def _tokenizer(folder: str | None):
    if not folder:
        raise KilnError(
            "calibration/evaluation text needs a tokenizer: pass tokenizer_dir=... (a folder with "
            "the model's tokenizer files)"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _schema() -> int:
    from kiln.runtime.artifact import SCHEMA_VERSION

    return SCHEMA_VERSION


def _eos_ids(cfg: Any) -> list[int]:
    v = getattr(cfg, "eos_token_id", None)
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def _signatures(graph) -> dict[str, Any]:
    ins = [{"name": n.name, "type": str(n.type)} for n in graph.inputs if not n.name.startswith("kv_cache_")]
    sig = {
        "inputs": ins
        + [
            {"name": "kv_caches", "type": f"tuple of {len(graph.meta['kv_cache']['layers'])} layers"},
            {"name": "weights", "type": "tuple (see weights)"},
        ],
        "outputs": [{"name": o.name, "type": str(o.type)} for o in graph.outputs],
    }
    return {name: dict(sig, **e.to_json()) for name, e in graph.meta["entry_points"].items()}


def load(path: str, **engine_options: Any):
    """Load an artifact directory into an `Engine` (needs only TVM's runtime, numpy and safetensors)."""
    from kiln.runtime.engine import Engine

    return Engine(path, **engine_options)


# -- build cache -----------------------------------------------------------------------------------


def build_key(
    source: str, target: str, passes: str, max_context: int | None, options: dict | None = None
) -> str | None:
    """A cache key for a model named by path: the content of its files plus every build option, with
    the content of the files an option names (calibration and evaluation text, tokenizer folder). Content,
    not name/size/mtime: a checkpoint replaced in place, or a calibration file edited, is a new build."""
    from .models import BUILTIN, builtin_gguf

    path = builtin_gguf(source) if source in BUILTIN else source
    if not os.path.exists(path):
        return None
    import torch

    opts = sorted((options or {}).items())
    named = {k: _content(str(v)) for k, v in opts if k in _FILE_OPTIONS and v and os.path.exists(str(v))}
    payload = json.dumps(
        [
            os.path.abspath(path),
            _content(path),
            target,
            passes,
            max_context,
            KILN_VERSION,
            torch.__version__,
            _tvm_version(),
            _host(),
            _source_hash(),
            opts,
            named,
        ],
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# options that name files whose content shapes a build
_FILE_OPTIONS = ("calib", "eval_text", "tokenizer_dir", "quant_plan")


def _content(path: str) -> list[tuple[str, int, str]]:
    """(name, size, SHA-256) of a file, or of every file under a folder."""
    from kiln.runtime.artifact import sha256_file

    if os.path.isfile(path):
        return [(os.path.basename(path), os.path.getsize(path), sha256_file(path))]
    out = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(root, n)
            if os.path.isfile(p):
                out.append((os.path.relpath(p, path), os.path.getsize(p), sha256_file(p)))
    return out


def _source_hash() -> str:
    """kiln's own code is part of a build's identity: a changed pass or kernel must not hit the cache."""
    import kiln.passes
    import kiln.targets

    h = hashlib.sha256()
    for mod in (kiln, kiln.passes, kiln.targets):
        assert mod.__file__ is not None  # regular packages, loaded from their source files
        root = os.path.dirname(mod.__file__)
        for d, subdirs, files in os.walk(root):  # subpackages too (kiln/ops/, targets/cpu/, ...)
            subdirs[:] = sorted(s for s in subdirs if s != "__pycache__")
            for n in sorted(files):
                if n.endswith(".py"):
                    with open(os.path.join(d, n), "rb") as f:
                        h.update(os.path.relpath(os.path.join(d, n), root).encode() + f.read())
    return h.hexdigest()[:16]


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def _host() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


@takes_progress
def cached_build(
    source: str,
    out: str,
    target: str = "cpu",
    passes: str = "O1",
    max_context: int | None = None,
    progress: Callable[[str], None] | None = None,
    use_cache: bool = True,
    **kw,
) -> tuple[str, bool]:
    """Build `source` into `out`, reusing an identical earlier build. Returns (path, from_cache)."""
    import inspect

    from .artifact import copy_artifact
    from .models import cache_dir

    defaults = {k: p.default for k, p in inspect.signature(compile).parameters.items()}
    # options left at their defaults do not change the build: the same build asked for two ways is one key
    options = {k: v for k, v in kw.items() if k != "dump_ir" and defaults.get(k, inspect.Parameter.empty) != v}
    key = build_key(source, target, passes, max_context, options) if use_cache and not kw.get("dump_ir") else None
    entry = os.path.join(cache_dir(), "builds", key) if key else None
    log.debug(f"build cache key {key} (options {options})" if key else "build cache not used")
    if entry and os.path.exists(os.path.join(entry, "manifest.json")):
        from kiln.runtime.artifact import ArtifactError, read_manifest, verify_files

        try:
            verify_files(entry, read_manifest(entry))
            log.info(f"identical build found in the build cache ({key})")
            copy_artifact(entry, out)
            return os.path.abspath(out), True
        except ArtifactError as e:
            log.info(f"build cache entry {key} is damaged ({e}); rebuilding")
    art = compile(source, target=target, passes=passes, max_context=max_context, **kw)
    log.info(f"writing artifact to {out}")
    path = art.save(out)
    if entry:
        copy_artifact(path, entry)
    return path, False
