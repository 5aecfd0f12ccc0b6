"""Draft models shipped inside an artifact (`kiln build --draft self:8`): found through the target's
manifest ("drafts": {kind: {path, ...}}) and loaded as Engines whose shared weights are the target's own
TVM arrays, so a self draft costs its library and KV cache, not a second copy of the weights."""

from __future__ import annotations

import os
import weakref
from typing import Any

import numpy as np

MODEL_DRAFTS = ("self", "distill")
_DRAFTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_draft(target, kind: str | None = None):
    """The draft model `kind` ("self", "distill"; None: the first the artifact has) shipped in the target's
    artifact (kiln build --draft), as an Engine with the target's KV budget. Weights the draft shares with
    the target are the target's own arrays (not read or held twice). Loaded once per target and kind."""
    from .artifact import ArtifactError
    from .engine import Engine

    have = (target.manifest.get("drafts") or {}) if hasattr(target, "manifest") else {}
    kind = kind or next((k for k in ("distill", "self") if k in have), next(iter(have), None))
    if kind is None or kind not in have:
        raise ValueError(
            f"the artifact at {getattr(target, 'path', '?')} has no {kind or 'model'} draft"
            f"{' (it has ' + ', '.join(have) + ')' if have else ''}: build it with "
            f"`kiln build MODEL -o DIR --draft {'distill:4' if kind == 'distill' else 'self:8'}`, or speculate "
            "with 'ngram'"
        )
    cache = _DRAFTS.setdefault(target, {})
    if kind in cache:
        return cache[kind]
    path = os.path.join(target.path, have[kind]["path"])
    from .artifact import read_manifest

    m = read_manifest(path)
    mine = {w["name"]: w for w in target.manifest["weights"]}
    by_name = dict(zip(mine, target.weights))
    given = {}
    own = None
    derived = m.get("derived_weights") or {}
    for w in m["weights"]:
        if w["name"] in derived:  # a table the target holds in the packed Linear layout (a tied embedding)
            d = derived[w["name"]]
            t = by_name.get(d.get("from"))
            if t is None or d.get("unpack") != "linear":
                raise ArtifactError(f"draft {kind}: weight {w['name']} cannot be derived from the target; rebuild it")
            packed = t.numpy()  # packed: [ceil(rows/NB), K, NB], packed[b, k, j] = table[b*NB + j, k]
            given[w["name"]] = np.ascontiguousarray(packed.transpose(0, 2, 1).reshape(-1, packed.shape[1])[: d["rows"]])
        elif w["name"] in m.get("shared_weights", ()):
            if w["name"] not in by_name:
                raise ArtifactError(f"draft {kind}: weight {w['name']} is not the target's; rebuild the artifact")
            given[w["name"]] = by_name[w["name"]]  # the target's TVM tensor, bound as is: no copy
        else:
            if own is None:
                from safetensors import safe_open

                from .artifact import WEIGHTS

                own = safe_open(os.path.join(path, WEIGHTS), framework="np")
            given[w["name"]] = own.get_tensor(w["name"])
    eng: Any = Engine(path, kv_cache_tokens=target.pool.num_pages * target.page_size, weights=given)
    d = m.get("draft") or {}
    if d.get("vocab_map") is not None:  # a reduced output layer: logit j scores token vocab_map[j]
        vmap = np.asarray(d["vocab_map"], dtype=np.int64)  # vmap: [head_tokens]
        if vmap.shape != (eng.vocab_size,) or int(d.get("vocab_size", -1)) != target.vocab_size:
            raise ArtifactError(f"draft {kind}: its token map does not fit the target's vocabulary; rebuild it")
        eng.vocab_map = vmap
        eng.vocab_size = target.vocab_size  # token ids in: the whole vocabulary (the embedding is the target's)
    cache[kind] = eng
    return eng
