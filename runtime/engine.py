"""The engine: loads an artifact with TVM's runtime only, owns the paged KV cache, generates text.

`generate` serves a static batch through the serving scheduler's static policy (runtime/serving.py):
each prompt is prefilled on its own (batch 1, any length), then all sequences decode together, one
token per sequence per step; a sequence leaves the batch when it stops.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .artifact import LIBRARY, WEIGHTS, ArtifactError, WeightFile, check_target, read_manifest
from .integrity import BackgroundVerification
from .kv_cache import PagePool, StateSlots, page_table
from .kv_layout import KVLayout
from .prompts import Prompt, as_prompt_list
from .prompts import encode as encode_prompt
from .sampling import SamplingParams, per_sequence
from .validate import column, cross_check, entry_inputs, serialized


def _threads() -> None:
    # TVM's pool assumes SMT and uses half the cores by default; kiln kernels want one thread per core.
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("TVM_NUM_THREADS", str(n))


class _Stored:
    """The arrays of a safetensors file, read one by one when asked for (`get`, `[name]`)."""

    def __init__(self, f: Any) -> None:
        self._f, self._names = f, set(f.keys())

    def get(self, name: str) -> np.ndarray | None:
        return self[name] if name in self._names else None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        try:
            return self._f.get_tensor(name)
        except Exception as e:  # a header that points outside the file, an unknown dtype
            raise ArtifactError(f"cannot read '{name}' from {WEIGHTS}: {e}; the artifact is corrupt: rebuild it") from e


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # with the stop token, when one ended it
    text: str = ""  # without stop strings and stop tokens
    finish_reason: str = ""  # "stop" (stop token, EOS, stop string, JSON complete) or "length"
    prefill_seconds: float = 0.0
    logprobs: list | None = None  # one decoding.TokenLogprob per token when params.logprobs is set
    index: int = 0  # which of the prompt's n completions


@dataclass
class DecodeStep:
    """A decode step's result (`Engine.decode_step`): `tokens[i]` the device's draw for row i (None where it
    drew none) and `logits(i)` row i's logits [vocab], read on demand; valid until the engine's next call."""

    logits: Callable[[int], np.ndarray]
    tokens: list[int | None]


class Engine:
    """Serve one artifact. `kv_cache_tokens` sizes the page pool (tokens over all sequences); a model with
    state-space layers also gets `state_slots` fixed-size states (sequences alive at once; default
    min(pages, 32)). `device_sampling=False` keeps every draw on the host (a cuda artifact otherwise draws
    decode tokens on the GPU where the request's parameters allow: `decode_step`).

    Calls are serialized: the TVM VM is not re-entrant, so `generate` and the entry points take the
    engine's lock and threads calling them at once run one after another."""

    def __init__(
        self,
        path: str,
        kv_cache_tokens: int = 8192,
        verify: bool = True,
        weights: dict | Callable[[dict, Any], dict] | None = None,
        cuda_graphs: bool = True,
        state_slots: int | None = None,
        device_sampling: bool = True,
        _rank: tuple[int, int, dict] | None = None,
    ) -> None:
        _threads()
        self._lock = threading.RLock()
        self.path = path
        self.manifest = read_manifest(path)
        check_target(self.manifest)
        self.on_gpu = self.manifest.get("target", {}).get("name") == "cuda"
        # a tensor-parallel artifact: rank 0 here starts and feeds the other ranks (runtime/rank_group.py)
        self.group: Any = None
        self.collectives: Any = None
        self.rank = _rank[0] if _rank is not None else 0
        tp = self.manifest.get("tensor_parallel") or {}
        if int(tp.get("ranks", 1)) > 1 and _rank is None:
            from .rank_group import start_group

            self.group = start_group(
                path,
                self.manifest,
                self.on_gpu,
                weights,
                kv_cache_tokens=kv_cache_tokens,
                verify=verify,
                cuda_graphs=cuda_graphs,
                state_slots=state_slots,
                device_sampling=device_sampling,
            )
        try:
            self._load(path, kv_cache_tokens, verify, weights, cuda_graphs, state_slots, device_sampling, _rank)
        except BaseException:
            if self.group is not None:
                self.group.close()
            raise
        if self.group is not None:
            self.group.ready()

    def _load(
        self,
        path: str,
        kv_cache_tokens: int,
        verify: bool,
        weights: Any,
        cuda_graphs: bool,
        state_slots: int | None,
        device_sampling: bool,
        _rank: tuple[int, int, dict] | None,
    ) -> None:
        # after the cheap host and device checks, before anything from the artifact is opened; the checksums
        # (hundreds of MB) are computed while TVM imports and the library, KV cache and tokenizer load, and
        # waited for in two steps: the library's before it is opened, the weights' before they are bound
        pending = BackgroundVerification(path, self.manifest) if verify and not self.on_gpu else None
        from .tvm_import import load_tvm

        tvm = load_tvm()  # before tvm.runtime.vm: keeps torch out of a serving process
        from tvm.runtime.vm import VirtualMachine

        self._tvm = tvm
        if self.on_gpu:
            from .cuda import prepare

            self.device = prepare(self.manifest, path, self.rank)
            pending = BackgroundVerification(path, self.manifest) if verify else None
        else:
            self.device = tvm.cpu()
        if pending is not None:
            pending.wait_for_code()
        try:
            lib = tvm.runtime.load_module(os.path.join(path, LIBRARY))
        except Exception as e:
            raise ArtifactError(f"cannot load {LIBRARY} from {path}: {e}") from e
        if int((self.manifest.get("tensor_parallel") or {}).get("ranks", 1)) > 1:
            from .collectives import register

            register()  # the VM looks up the library's collective calls when it is made
        self.vm = VirtualMachine(lib, self.device)
        self.kv_layout = KVLayout.from_manifest(self.manifest, self.device)
        self.page_size = self.kv_layout.page_size
        self.max_context = int(self.manifest["max_context"])
        self.pool = PagePool(-(-int(kv_cache_tokens) // self.page_size), self.page_size)
        # one tensor per cache input of the program, in its order (`pages` and `slots` are ours to choose)
        self.state_slots: StateSlots | None = None
        if self.kv_layout.state:  # state-space layers: a fixed-size state per live sequence, not pages
            n = int(state_slots or min(self.pool.num_pages, 32))
            self.caches = self.kv_layout.allocate(self.pool.num_pages, n)
            table = self.kv_layout.slot_table()
            assert table is not None  # the layout has state
            self.state_slots = StateSlots(table, n, self.pool)
        else:
            self.caches = self.kv_layout.allocate(self.pool.num_pages)
        self.gemv_max_batch = int(self.manifest.get("target", {}).get("gemv_max_batch", 0))
        # decode tokens drawn on the device (`decode_step`), where the artifact has the `sample` function
        self.device_sampling = bool(device_sampling and self.manifest.get("target", {}).get("sampler"))
        self._graphs = None
        if self.on_gpu and cuda_graphs:  # decode steps replay as CUDA graphs (one launch per step)
            from .cuda import GraphRunner

            self._graphs = GraphRunner(self)
            self._pt_width = -(-self.max_context // self.page_size)
        self.tokenizer = None
        tok_dir = os.path.join(path, "tokenizer")
        if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            from .tokenizer import Tokenizer

            self.tokenizer = Tokenizer(tok_dir)
        if pending is not None:
            pending.wait()  # every checksum, the weights' too, before they are bound and anything runs
        if callable(weights):  # made here, for this rank (a tensor-parallel group calls it in every rank)
            weights = weights(self.manifest, self.device)
        self.weights = self._load_weights() if weights is None else self._bind_weights(weights)
        arch = self.manifest.get("target", {}).get("arch") if self.on_gpu else None
        if self.group is not None:  # the collectives meet the other ranks' before the first program runs
            self.collectives = self.group.connect(self.device, arch)
        elif _rank is not None:
            from .rank_group import connect_worker

            self.collectives = connect_worker(_rank[2], _rank[1], _rank[0], self.device, arch)
        self.vocab_size = cross_check(self)  # the manifest's shape facts against the library, before serving
        self.eos_ids = tuple(self.manifest.get("eos_token_ids") or ())

    closed = False

    def close(self) -> None:
        """Free what the engine holds: its CUDA graphs, KV cache, weights and the VM with its memory pool. On
        the GPU the memory goes back to the device now instead of when the process ends, so engines can be
        loaded one after another in one process. Later calls raise a clear error; closing twice is a no-op."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.group is not None:
                self.group.close()  # its collectives too
                self.group = None
            elif self.collectives is not None:
                self.collectives.close()
            self.collectives = None
            if self._graphs is not None:
                self._graphs.close()
                self._graphs = None
            self.caches = self.weights = self.kv_layout.caches = ()
            del self.vm
            import gc

            gc.collect()  # the VM's tensors go now, so the pool below can hand their memory back
            clear = self._tvm.get_global_func("vm.builtin.memory_manager.clear", allow_missing=True)
            if clear is not None:
                clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bind_weights(self, given: dict) -> tuple:
        """Weights supplied by the caller (an artifact built with pack_weights=False): numpy arrays or
        DLPack tensors (torch, on the engine's device), one per manifest field."""
        out = []
        for spec in self.manifest["weights"]:
            a = given.get(spec["name"])
            if a is None:
                raise ArtifactError(f"no weight given for field '{spec['name']}' {spec['dtype']}{spec['shape']}")
            if tuple(a.shape) != tuple(spec["shape"]) or str(a.dtype).replace("torch.", "") != spec["dtype"]:
                raise ArtifactError(
                    f"weight '{spec['name']}' is {a.dtype}{list(a.shape)}, the manifest says "
                    f"{spec['dtype']}{spec['shape']}"
                )
            out.append(
                self._tvm.runtime.tensor(a, self.device)
                if isinstance(a, np.ndarray)
                else self._tvm.runtime.from_dlpack(a)
            )
        return tuple(out)

    def _load_weights(self) -> tuple:
        if not self.manifest.get("weights_included", True):
            raise ArtifactError(
                "this artifact was built without weights (pack_weights=False): pass them with "
                "Engine(path, weights={field: array})"
            )
        from .tvm_import import host_tensor

        try:  # each array is read once, into aligned memory that becomes its TVM tensor without a copy
            arrays: Any = _Stored(WeightFile(os.path.join(self.path, WEIGHTS)))
        except Exception as e:
            raise ArtifactError(f"cannot read {WEIGHTS}: {e}; the artifact is corrupt: rebuild it") from e
        out = []
        for spec in self.manifest["weights"]:
            a = arrays.get(spec["name"])
            if a is None and spec.get("storage"):  # stored sparse: expand to the dense field the kernels read
                from .sparse import expand

                try:
                    a = expand(arrays, spec["name"], spec["storage"])
                except (KeyError, ValueError) as e:
                    raise ArtifactError(
                        f"sparse weight '{spec['name']}' cannot be expanded ({e}); rebuild the artifact"
                    ) from e
            if a is None:
                raise ArtifactError(f"{WEIGHTS} lacks weight '{spec['name']}'; rebuild the artifact")
            if tuple(a.shape) != tuple(spec["shape"]) or str(a.dtype) != spec["dtype"]:
                raise ArtifactError(
                    f"weight '{spec['name']}' is {a.dtype}{list(a.shape)}, the manifest says "
                    f"{spec['dtype']}{spec['shape']}; rebuild the artifact"
                )
            out.append(host_tensor(a, self.device))
        return tuple(out)

    # -- low-level entry points -------------------------------------------------------------------
    def _t(self, a: np.ndarray):
        return self._tvm.runtime.tensor(a, self.device)

    def _run(
        self,
        fn: str,
        arrays: list[np.ndarray],
        then: tuple[str, list[np.ndarray]] | None = None,
        graph: bool = False,
        while_running: Callable[[], None] | None = None,
    ) -> tuple[Any, Any]:
        """Entry point `fn` on host `arrays` (then the caches and weights), with `then` = (function, more
        arrays) run on its output; as a captured CUDA graph when `graph`. Returns the output tensors (fn's,
        then's or None). In a tensor-parallel group every rank runs the same call: rank 0 forwards it first."""
        if self.group is not None:
            self.group.send(("run", fn, arrays, then, graph))
        try:
            if graph:
                assert self._graphs is not None  # `graph` is asked for only where there are graphs
                out = self._graphs.run(fn, arrays, then, while_running)
            else:
                y = self.vm[fn](*(self._t(a) for a in arrays), self.caches, self.weights)
                out = (y, self.vm[then[0]](y, *(self._t(a) for a in then[1])) if then is not None else None)
                if while_running is not None:  # the kernels are queued; reading a result waits for them
                    while_running()
                if self.group is not None:
                    self.device.sync()  # the step is complete (or failed) before the group is checked
        except Exception:
            if self.group is not None:
                self.group.check()  # a dead rank explains the failure better
            raise
        if self.group is not None:
            self.group.check()
        return out

    @serialized
    def prefill(self, ids: Sequence[int], pages: list[int], start: int = 0) -> np.ndarray:
        """Run `ids` (positions start..start+n-1) through the model, filling the cache; returns the
        last token's logits [vocab]."""
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
            raise ValueError(f"prefill: start must be an int position, got {start!r}")
        n = len(ids)
        x, pos = entry_inputs(self, [list(ids)], [list(range(start, start + n))], [pages], "prefill")
        if self.state_slots is not None and start == 0:
            self.state_slots.assign(pages[0])  # a new sequence: its state row (see StateSlots)
        out, _ = self._run("prefill", [x, pos.astype(np.int32), page_table([pages])])
        return out.numpy()[0, -1]

    @serialized
    def decode(self, tokens: Sequence[int], positions: Sequence[int], pages: list[list[int]]) -> np.ndarray:
        """One new token per sequence; returns logits [batch, vocab]."""
        return self._decode(tokens, positions, pages)[0].numpy()[:, -1]

    @serialized
    def decode_step(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        pages: list[list[int]],
        draws: Sequence[tuple[float, int] | None],
        while_running: Callable[[], None] | None = None,
    ) -> DecodeStep:
        """One new token per sequence, as `decode`. Where the artifact draws on the device (`device_sampling`)
        and `draws[i]` is (temperature, key), row i's token is drawn there (targets/cuda/sample.py: the argmax
        at temperature 0) and its logits stay on the device unless read: a step then copies token ids to the
        host instead of [batch, vocab] logits. `while_running` is called once the step is launched, before
        waiting for it: host work that overlaps the GPU's (it must not touch the engine)."""
        if len(draws) != len(tokens):
            raise ValueError(f"decode_step: {len(draws)} draws for {len(tokens)} sequences")
        for i, d in enumerate(draws):
            ok = d is None or (
                isinstance(d, tuple)
                and len(d) == 2
                and isinstance(d[0], (int, float))
                and math.isfinite(d[0])
                and d[0] >= 0
                and isinstance(d[1], int)
            )
            if not ok:
                raise ValueError(
                    f"decode_step: draws[{i}] is {d!r}: give None (the host samples) or (temperature >= 0, int key)"
                )
        if not self.device_sampling or all(d is None for d in draws):
            logits = self.decode(tokens, positions, pages)
            if while_running is not None:
                while_running()
            return DecodeStep(lambda i: logits[i], [None] * len(draws))
        temp = np.array([max(float(d[0]), 0.0) if d else 0.0 for d in draws], dtype=np.float32)
        key = np.array([int(d[1]) & 0x7FFFFFFF if d else 0 for d in draws], dtype=np.int32)
        out, drawn = self._decode(tokens, positions, pages, (temp, key), while_running)
        ids = drawn.numpy()
        t, v = int(out.shape[1]), int(out.shape[2])

        def row(i: int) -> np.ndarray:  # one row's bytes from the device
            return out._create_view((v,), "float32", (i * t + t - 1) * v * 4).numpy()

        return DecodeStep(row, [int(ids[i]) if d is not None else None for i, d in enumerate(draws)])

    def _decode(
        self,
        tokens,
        positions,
        pages,
        sample: tuple[np.ndarray, np.ndarray] | None = None,
        while_running: Callable[[], None] | None = None,
    ) -> Any:
        """Run decode (or decode_batched) as a CUDA graph where there are graphs; with `sample`, the device's
        draws too, and `while_running` between launching them and reading them back. Returns the logits tensor
        (and the draws)."""
        x, pos = entry_inputs(
            self, column(tokens, "decode: tokens"), column(positions, "decode: positions"), pages, "decode"
        )
        pos = pos.astype(np.int32)
        fn = "decode_batched" if self.gemv_max_batch and len(tokens) > self.gemv_max_batch else "decode"
        then = ("sample", list(sample)) if sample is not None else None
        graph = self._graphs is not None
        table = page_table(pages, self._pt_width) if graph else page_table(pages)
        return self._run(fn, [x, pos, table], then, graph, while_running)

    @serialized
    def verify(
        self, tokens: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], pages: list[list[int]]
    ) -> np.ndarray:
        """Several new tokens per sequence (equal counts), filling the cache; returns logits for every
        token [batch, tokens, vocab] (speculative decoding checks draft tokens with this)."""
        if self.state_slots is not None:
            raise ArtifactError(
                "verify: this model has state-space layers, whose state cannot take back rejected draft tokens; "
                "serve it without speculative decoding"
            )
        x, pos = entry_inputs(self, tokens, positions, pages, "verify")
        out, _ = self._run("verify", [x, pos.astype(np.int32), page_table(pages)])
        return out.numpy()

    # -- generation -------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Text (through the chat template when `chat`), chat messages, or token ids -> token ids, each an
        int in [0, vocab)."""
        return encode_prompt(self.tokenizer, prompt, chat, self.vocab_size)

    def _check(self, ids: list[int], p: SamplingParams, i: int) -> None:
        if not ids:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        need = len(ids) + p.max_tokens
        if need > self.max_context:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_tokens={p.max_tokens} it needs "
                f"{need} positions but the artifact supports {self.max_context}: shorten the prompt or "
                "lower max_tokens"
            )

    @serialized
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        chat: bool = False,
        stream: Callable[[int, int], None] | None = None,
        draft=None,
    ) -> list[Completion]:
        """Generate for a static batch of prompts: a string, a list of strings, token ids, a list of
        token-id lists, or chat messages (one chat or a list of chats; see prompts.py). Returns n
        completions per prompt (params.n), prompt by prompt. `stream(i, token)` sees each token as it
        is produced (i indexes the returned list). Requests that cannot fit are refused before any work
        starts, and every page the batch needs is free at the start, so it runs without preemption."""
        prompts = as_prompt_list(prompts)
        given = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(given) != len(prompts):
            raise ValueError(f"give one SamplingParams, or one per prompt ({len(prompts)}), not {len(given)}")
        for p in given:
            p.validate()
        encoded, plist, index = [], [], []
        for ids, p in zip((self.encode(x, chat) for x in prompts), given):
            for j, q in enumerate(per_sequence(p)):
                encoded.append(ids)
                plist.append(q)
                index.append(j)
        for i, (ids, p) in enumerate(zip(encoded, plist)):
            self._check(ids, p, i)
        if self.state_slots is not None and len(encoded) > len(self.state_slots.free):
            raise ValueError(
                f"this batch has {len(encoded)} sequences but {len(self.state_slots.free)} of "
                f"{self.state_slots.num_slots} state slots are free: send fewer requests, or load with more state_slots"
            )
        need = sum(self.pool.pages_for(len(ids) + p.max_tokens) for ids, p in zip(encoded, plist))
        if need > len(self.pool.free):
            raise ValueError(
                f"this batch needs {need} KV pages but {len(self.pool.free)} of {self.pool.num_pages} "
                "are free: send fewer or shorter requests, or load with a larger kv_cache_tokens"
            )
        if not encoded:
            return []
        from .static_batch import run_static_batch  # the scheduler imports this module

        callbacks: list[Callable[[int], None] | None] = [
            None if stream is None else functools.partial(stream, i) for i in range(len(encoded))
        ]
        outs = run_static_batch(self, encoded, plist, callbacks, draft)
        for c, j in zip(outs, index):
            c.index = j
        return outs
