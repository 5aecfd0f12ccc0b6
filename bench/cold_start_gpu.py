"""Cold start on the GPU: `bench/cold_start.py --gpu ARTIFACT_DIR` (see that script's docstring).

The artifact is one built without weights (`bench/gpu_decode.py build DIR --models llama-3.1-8b --variants
fp16`). This module first writes, to local disk, what a user would have there:

- a copy of the artifact with seeded random weights of the real shapes in its own weight file
  (weights.safetensors, made from the model below by kiln.targets.cuda.weights.WeightMaker, listed in the
  copy's manifest with its size and SHA-256, so that the engine verifies it as any artifact's);
- a transformers checkpoint of the same model (`save_pretrained`, fp16, safetensors), the model being
  `AutoModelForCausalLM.from_config` of the config the artifact's manifest records, seeded.

Then each way runs in a fresh subprocess, timed from just before its start to the first generated token
on its stdout (the same seeded prompt of PROMPT_TOKENS token ids, greedy):

- kiln, kernel cache cold:  the engine with its defaults (checksums on, CUDA graphs on), an empty kernel
  cache (KILN_CUDA_CACHE), the artifact's own compiled kernels ignored (KILN_CUDA_KERNELS=0): nvcc at load;
- kiln, kernel cache warm:  the same, with the cache the cold run filled;
- kiln, artifact kernels:   the artifact's own compiled kernels, empty cache (when the artifact does not
                            carry them and nvcc is installed, `kiln kernels` stores them in the copy first);
- kiln, no verify:          warm cache, checksums off;
- transformers:             from_pretrained(dtype=fp16, device_map=cuda) and one forward pass.

The kiln child also prints its second token: its time includes the capture of the decode step's CUDA
graph, which the engine does at the first decode step. The weights were just written, so the page cache
holds them (as for the CPU figures); a first read from a cold disk is slower by the disk's time.

`--device cpu` runs the same code path against a CPU artifact (weights: seeded random arrays per manifest
field; transformers in fp32): tests/test_cold_start.py runs it so that the GPU run does not fail on a typo.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

PROMPT_TOKENS = 32

_KILN = """
import json, sys
from kiln.runtime.artifact import hand_verified_weights_to_loader
from kiln.runtime.engine import Engine
from kiln.runtime.sampling import SamplingParams
path, ids, verify = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
hand_verified_weights_to_loader()  # as `kiln run` and `kiln serve` do
eng = Engine(path, verify=verify)
def stream(i, token):
    sys.stdout.write(f"{token}\\n")
    sys.stdout.flush()
eng.generate([ids], SamplingParams(max_tokens=2), stream=stream)
"""

_HF = """
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import AutoModelForCausalLM
folder, ids, device = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
dtype = torch.float16 if device == "cuda" else torch.float32
try:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)
except (ImportError, ValueError) as e:  # device_map wants accelerate on some versions
    print(f"device_map={device} failed ({e}); loading, then .to({device})", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
with torch.no_grad():
    nxt = int(model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].argmax())
sys.stdout.write(f"{nxt}\\n")
sys.stdout.flush()
"""


def token_times(cmd: list[str], env: dict[str, str], lines: int) -> list[float]:
    """Seconds from starting `cmd` to each of its first `lines` lines on stdout; it then runs to its end."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert p.stdout is not None
    out = []
    for _ in range(lines):
        if not p.stdout.readline():
            break
        out.append(time.perf_counter() - t0)
    _, err = p.communicate(timeout=1800)
    if len(out) < lines or p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({p.returncode}): {err.decode()[-3000:]}")
    for note in dict.fromkeys(ln for ln in err.decode().splitlines() if ln.startswith("kiln: ")):
        print(f"  {note}", file=sys.stderr)  # e.g. the artifact's kernels passed over, and why
    return out


def _model(manifest: dict[str, Any], device: str) -> Any:
    """The model the artifact was built from, seeded random weights, in the dtype each way loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(manifest["model"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _weights(manifest: dict[str, Any], model: Any) -> dict[str, Any]:
    """Every manifest weight field as a CPU torch tensor: made from the model's tensors in the kernels'
    layouts for a cuda artifact; seeded random arrays of each field's shape and dtype otherwise."""
    import numpy as np
    import torch

    if manifest["target"]["name"] == "cuda":
        from kiln.targets.cuda.weights import WeightMaker, tensors_of

        made = WeightMaker(tensors_of(model)).all(manifest)
        return {k: v.detach().cpu().contiguous() for k, v in made.items()}
    rng = np.random.default_rng(0)
    out = {}
    for spec in manifest["weights"]:
        dt = np.dtype(spec["dtype"])
        a = rng.standard_normal(spec["shape"], dtype=np.float32) * 0.02
        out[spec["name"]] = torch.from_numpy(a.astype(dt) if dt.kind == "f" else np.zeros(spec["shape"], dt))
    return out


def write_inputs(artifact: str, work: str, device: str) -> tuple[str, str, dict[str, Any]]:
    """The artifact with its weights and the transformers checkpoint, under `work`; returns their folders
    and the artifact copy's manifest."""
    import torch
    from safetensors.torch import save_file

    from kiln.runtime.artifact import MANIFEST, MANIFEST_SUM, WEIGHTS, read_manifest, verify_files
    from kiln.runtime.integrity import file_entry, manifest_sum_line

    manifest = read_manifest(artifact)
    verify_files(artifact, manifest)
    art, hf = os.path.join(work, "artifact"), os.path.join(work, "transformers")
    shutil.copytree(artifact, art)
    if manifest["target"]["name"] == "cuda" and not manifest.get("cuda_kernels"):
        from kiln.runtime.cuda_kernels import nvcc_path, store_kernels

        if nvcc_path():  # `kiln kernels` on the copy: the way a deployed artifact starts without nvcc
            t = time.perf_counter()
            store_kernels(art)
            print(f"stored the compiled kernels in the copy in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            manifest = read_manifest(art)
    t = time.perf_counter()
    model = _model(manifest, device)
    model.save_pretrained(hf, safe_serialization=True)
    weights = _weights(manifest, model)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the timed processes get the whole GPU
    save_file(weights, os.path.join(art, WEIGHTS))
    del weights
    wp = os.path.join(art, WEIGHTS)
    manifest["weights_included"] = True
    manifest["files"][WEIGHTS] = file_entry(wp)
    with open(os.path.join(art, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    with open(os.path.join(art, MANIFEST_SUM), "w") as f:
        f.write(manifest_sum_line(os.path.join(art, MANIFEST)))
    verify_files(art, read_manifest(art))  # what the timed runs will check, checked once here
    print(f"wrote weights and checkpoint in {time.perf_counter() - t:.1f} s under {work}", file=sys.stderr)
    return art, hf, manifest


def run_gpu(
    artifact: str, runs: int, device: str, work: str | None, results: str, only: list[str] | None = None
) -> dict[str, Any]:
    """Write the inputs, time every way (or the ways in `only`) `runs` times (rotated), merge the medians into
    `results`."""
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from results_io import commit, machine

    tmp = tempfile.mkdtemp(prefix="kiln-cold-gpu-", dir=work)
    try:
        art, hf, manifest = write_inputs(artifact, tmp, device)
        vocab = int(manifest["model"]["vocab_size"])
        ids = [int(x) for x in np.random.default_rng(1).integers(0, vocab, PROMPT_TOKENS)]
        base = dict(os.environ)
        warm = os.path.join(tmp, "kernel-cache")

        def kiln_way(verify: bool, cache: str | None, artifact_kernels: bool) -> tuple[list[str], dict[str, str]]:
            env = dict(base, KILN_CUDA_CACHE=cache or tempfile.mkdtemp(prefix="cache-", dir=tmp))
            env["KILN_CUDA_KERNELS"] = "1" if artifact_kernels else "0"
            return [sys.executable, "-c", _KILN, art, json.dumps(ids), "1" if verify else "0"], env

        ways: dict[str, Any] = {
            "kiln_cold_cache": lambda: kiln_way(True, None, False),  # a fresh empty cache every run
            "kiln_warm_cache": lambda: kiln_way(True, warm, False),
            "kiln_no_verify": lambda: kiln_way(False, warm, False),
            "transformers": lambda: ([sys.executable, "-c", _HF, hf, json.dumps(ids), device], base),
        }
        if manifest.get("cuda_kernels"):
            ways["kiln_artifact_kernels"] = lambda: kiln_way(True, None, True)
        if only:
            ways = {k: v for k, v in ways.items() if k in only}
        if any(k in ways for k in ("kiln_warm_cache", "kiln_no_verify")):  # the cold run first: it fills the cache
            token_times(*kiln_way(True, warm, False), lines=2)
        times: dict[str, list[list[float]]] = {k: [] for k in ways}
        order = list(ways)
        for r in range(runs):
            for k in order[r % len(order) :] + order[: r % len(order)]:
                times[k].append(token_times(*ways[k](), lines=1 if k == "transformers" else 2))
        med = {k: round(statistics.median(t[0] for t in v), 3) for k, v in times.items()}
        second = {k: round(statistics.median(t[1] for t in v), 3) for k, v in times.items() if k != "transformers"}
        headline = next(k for k in ("kiln_artifact_kernels", "kiln_warm_cache", "kiln_cold_cache") if k in med)
        print(f"{'way':<24} {'first token (s)':>16} {'second (s)':>11} {'vs transformers':>16}")
        for k, v in med.items():
            print(f"{k:<24} {v:>16.2f} {second.get(k, float('nan')):>11.2f} {med['transformers'] / v:>15.1f}x")
        gpu = {
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "commit": commit(),
            "artifact": os.path.basename(os.path.normpath(artifact)),
            "device": device,
            "weights_bytes": os.path.getsize(os.path.join(art, "weights.safetensors")),
            "prompt_tokens": PROMPT_TOKENS,
            "runs": runs,
            "headline_way": headline,
            "first_token_s": med,
            "second_token_s": second,
            "all_runs_s": {k: [[round(x, 3) for x in t] for t in v] for k, v in times.items()},
            "note": "page cache warm (weights just written); second token includes the decode CUDA graph capture",
        }
        figures = {
            "gpu_first_token_s": med[headline],
            "gpu_first_token_cold_kernel_cache_s": med.get("kiln_cold_cache"),
            "transformers_gpu_first_token_s": med["transformers"],
            "gpu": gpu,
        }
        doc: dict[str, Any] = {}
        if os.path.exists(results):
            with open(results) as f:
                doc = json.load(f)
        doc.update(figures)
        with open(results, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"merged the GPU figures into {results}")
        return figures
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
