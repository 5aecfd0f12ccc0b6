"""Soak: random request streams through `Server` for a given time, counting what must stay zero.

    .venv/bin/python bench/soak.py [--minutes 10] [--seed 0] [--artifact DIR] [--no-write]

Rounds of a seeded random stream run on a real artifact (by default a tiny random-weight Llama built
here, about 20 s; a small page pool so that requests preempt and evict). Each round starts a fresh
`Server` with a random policy, batch size and prefill chunk; three client threads submit requests with
random arrival gaps: good prompts (greedy or sampled), prompts with bad ids (negative, >= vocab, empty),
bad sampling values (NaN, negative, zero), too-long requests, cancels from the stream callback, and
callbacks that raise Exception, SystemExit or KeyboardInterrupt. Between rounds a few threads call
`Engine.generate` at once on the reference engine.

Counted per request: served, cancelled, refused at submit, failed as it should (its own callback or
sampling values), and `crashed` (anything else: an unexpected error, a hang past the timeout, a bad
request accepted). Per round: pages not back in the pool after close (`pages_leaked`). Per good greedy
request: output different from the same prompt run alone (`outputs_differ_from_solo`). The last three
must be 0. Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # results_io
RAISES = (Exception, SystemExit, KeyboardInterrupt)


def tiny_artifact(out: str) -> str:
    """A 2-layer random Llama (vocab 97, GQA 6/3 heads), built for the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import kiln

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=256,
    )
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # well-separated greedy choices
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    return kiln.compile(m, target="cpu", passes="O1").save(out)


def one_request(rng: np.random.Generator, vocab: int) -> tuple[str, list, dict, object, int]:
    kind = rng.choice(["greedy"] * 5 + ["sampled"] * 2 + ["bad_prompt", "bad_params", "too_long"])
    prompt: list = rng.integers(0, vocab, size=int(rng.integers(1, 60))).tolist()
    params: dict = dict(max_tokens=int(rng.integers(1, 24)), ignore_eos=bool(rng.integers(2)))
    if kind == "sampled":
        params.update(temperature=float(rng.uniform(0.1, 2)), top_k=int(rng.integers(0, 30)), seed=int(rng.integers(9)))
    elif kind == "bad_prompt":
        prompt = [] if rng.integers(4) == 0 else prompt + [int(rng.choice([vocab, -1, 10**9, vocab + 7]))]
    elif kind == "bad_params":
        params.update(
            [dict(temperature=math.nan), dict(top_p=0.0), dict(max_tokens=0), dict(temperature=-2.0)][rng.integers(4)]
        )
    elif kind == "too_long":
        prompt, params["max_tokens"] = rng.integers(0, vocab, size=250).tolist(), 20
    fault = [None, None, None, None, "cancel", Exception, SystemExit, KeyboardInterrupt][rng.integers(8)]
    return str(kind), prompt, params, fault, int(rng.integers(0, 6))


def _callback(fault, at: int, cell: list):
    if fault is None:
        return None
    seen = [0]

    def cb(tok: int) -> None:
        seen[0] += 1
        if seen[0] > at:
            if fault != "cancel":
                raise fault("soak callback")
            if cell:
                cell[0].cancel()

    return cb


class Soak:
    def __init__(self, path: str, seed: int) -> None:
        import kiln

        self.eng = kiln.load(path, kv_cache_tokens=384)  # 24 pages of 16: preemption and eviction
        self.ref = kiln.load(path, kv_cache_tokens=4096)
        self.rng = np.random.default_rng(seed)
        self.counts: Counter = Counter()
        self.refs: dict = {}
        self.problems: list[str] = []
        self.lock = threading.Lock()

    def solo(self, prompt: list[int], params: dict) -> list[int]:
        from kiln.runtime.sampling import SamplingParams

        key = (tuple(prompt), params["max_tokens"], params["ignore_eos"])
        if key not in self.refs:
            self.refs[key] = self.ref.generate([prompt], SamplingParams(**params))[0].token_ids
        return self.refs[key]

    def bad(self, what: str) -> None:
        with self.lock:
            self.counts["crashed"] += 1
            if len(self.problems) < 20:
                self.problems.append(what)

    def client(self, srv, reqs: list, seed: int) -> None:
        from kiln.runtime.sampling import SamplingParams
        from kiln.runtime.serving import RequestFailed

        rng = np.random.default_rng(seed)
        handles = []
        for kind, prompt, params, fault, at in reqs:
            time.sleep(float(rng.exponential(0.003)))
            cell: list = []
            try:
                h = srv.submit(prompt, SamplingParams(**params), callback=_callback(fault, at, cell))
            except ValueError:
                ok = kind in ("bad_prompt", "bad_params", "too_long")
                with self.lock:
                    self.counts["refused"] += ok
                if not ok:
                    self.bad(f"good request refused: {prompt} {params}")
                continue
            except BaseException as e:
                self.bad(f"submit raised {e!r}")
                continue
            if kind in ("bad_prompt", "too_long"):
                self.bad(f"bad request accepted: {kind} {prompt} {params}")
            cell.append(h)
            handles.append((kind, prompt, params, fault, at, h))
        for kind, prompt, params, fault, at, h in handles:
            try:
                c = h.result(timeout=120)
            except RequestFailed:
                if fault in RAISES or math.isnan(params.get("temperature", 0.0)):
                    with self.lock:
                        self.counts["failed_as_expected"] += 1
                else:
                    self.bad(f"request failed: {h.error!r}")
                continue
            except BaseException as e:
                self.bad(f"result raised {e!r}")
                continue
            if fault in RAISES and len(c.token_ids) > at:
                self.bad(f"its callback raised after token {at} but the request finished: {c.finish_reason}")
            greedy = kind == "greedy"
            with self.lock:
                self.counts["cancelled" if c.finish_reason == "cancelled" else "served"] += 1
            if greedy:
                ref = self.solo(prompt, params)
                same = c.token_ids == (ref if fault is None else ref[: len(c.token_ids)])
                with self.lock:
                    self.counts["greedy_compared"] += 1
                    self.counts["outputs_differ_from_solo"] += not same

    def round(self) -> None:
        from kiln.runtime.serving import POLICIES, Server

        rng = self.rng
        srv = Server(
            self.eng,
            policy=str(rng.choice(POLICIES)),
            max_batch=int(rng.integers(1, 9)),
            prefill_chunk=int(rng.integers(4, 80)),
            max_wait_s=0.003,
        )
        streams = [[one_request(rng, self.eng.vocab_size) for _ in range(int(rng.integers(3, 12)))] for _ in range(3)]
        threads = [threading.Thread(target=self.client, args=(srv, s, int(rng.integers(1 << 30)))) for s in streams]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
            if t.is_alive():
                self.bad("a client thread hung")
        srv.close()
        leaked = self.eng.pool.num_pages - len(self.eng.pool.free)
        self.counts["pages_leaked"] += leaked
        self.counts["rounds"] += 1
        if rng.integers(4) == 0:
            self.threaded_generate()

    def threaded_generate(self) -> None:
        """Several threads in Engine.generate at once: they are serialized, and each equals its solo run."""
        from kiln.runtime.sampling import SamplingParams

        prompts = [
            self.rng.integers(0, self.ref.vocab_size, size=int(self.rng.integers(1, 30))).tolist() for _ in range(3)
        ]
        params = dict(max_tokens=8, ignore_eos=True)
        want = [self.solo(p, params) for p in prompts]
        got: dict = {}
        ts = [
            threading.Thread(
                target=lambda i=i: got.update(
                    {i: self.ref.generate([prompts[i]], SamplingParams(**params))[0].token_ids}
                )
            )
            for i in range(3)
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
        self.counts["threaded_generate_calls"] += 3
        self.counts["outputs_differ_from_solo"] += sum(got.get(i) != want[i] for i in range(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--artifact", help="artifact to serve (default: a tiny random Llama built here)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/soak.json")
    a = ap.parse_args()
    path = a.artifact or tiny_artifact(os.path.join(tempfile.mkdtemp(prefix="kiln-soak-"), "tiny-llama"))
    s = Soak(path, a.seed)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < a.minutes * 60:
        s.round()
    wall = time.perf_counter() - t0
    c = s.counts
    figures = {
        "artifact": "tiny random Llama (2 layers, vocab 97)" if not a.artifact else a.artifact,
        "minutes": round(wall / 60, 2),
        "rounds": c["rounds"],
        "requests_served": c["served"],
        "requests_cancelled": c["cancelled"],
        "requests_refused": c["refused"],
        "requests_failed_as_expected": c["failed_as_expected"],
        "crashed": c["crashed"],
        "pages_leaked": c["pages_leaked"],
        "greedy_outputs_compared": c["greedy_compared"] + c["threaded_generate_calls"],
        "outputs_differ_from_solo": c["outputs_differ_from_solo"],
        "problems": s.problems,
    }
    width = max(len(k) for k in figures)
    for k, v in figures.items():
        print(f"{k:<{width}}  {v}")
    if not a.no_write:
        from results_io import write_results

        write_results("soak", figures)
    bad = c["crashed"] + c["pages_leaked"] + c["outputs_differ_from_solo"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
