"""Cold start on the CPU: seconds from a process's start to its first generated token, SmolLM2-135M.

Each way runs in a fresh process, started by this script, which times from just before the start to the
first byte of generated text on the process's stdout (the same chat prompt, greedy, one token):

- kiln bundle:   `./run` of `kiln bundle` (python -I -S with the bundle's packages only; no torch, no
                 TVM compiler), with the artifact's full integrity check (the default) and with --no-verify;
- kiln install:  `python -m kiln.cli run` in the full environment (torch and TVM's compiler installed);
- transformers:  a script that imports torch and transformers, loads the same checkpoint (the fp32
                 safetensors folder kiln converts the GGUF into) and answers.

Every way runs --runs times, in an order rotated each run; the median is reported (the page cache is warm
after the first run), with the
host's load average before and after (the host is shared: quote the ratios).
The artifact is the README's default build (`kiln build smollm2-135m -o out/smollm2`), from the build cache
when there.

    python bench/cold_start.py [--runs 3] [--artifact DIR]

On the GPU host (TVM's runtime, torch, transformers and nvcc installed; bench/cold_start_gpu.py says what
runs), against an artifact built without weights on any host with TVM's compiler:

    python bench/gpu_decode.py build /data/kiln-gpu --models llama-3.1-8b --variants fp16   # build host
    python bench/cold_start.py --gpu /data/kiln-gpu/llama-3.1-8b-fp16 --runs 3 --work /data/tmp   # GPU host

merges gpu_first_token_s (and the transformers figure, and every way's runs under "gpu") into
bench/results/cold_start.json. `--work` must be local disk with room for the weights twice (about 33 GB
for the 8B model: kiln's weight file and the transformers checkpoint).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import write_results

PROMPT = "What is the capital of France?"

_HF = """
import os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    nxt = int(model(input_ids=ids).logits[0, -1].argmax())
sys.stdout.write(tok.decode([nxt]) or "?")
sys.stdout.flush()
"""


def first_token_seconds(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds from starting `cmd` to the first byte on its stdout; the process then runs to its end."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert p.stdout is not None
    first = p.stdout.read(1)
    dt = time.perf_counter() - t0
    _, err = p.communicate(timeout=600)
    if not first or p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({p.returncode}): {err.decode()[-2000:]}")
    return dt


def default_artifact() -> str:
    """The README's default build, through the build cache (built here the first time)."""
    from kiln.api import cached_build

    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out", "smollm2")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        cached_build("smollm2-135m", out, target="cpu", passes="O1", progress=lambda m: print(m, file=sys.stderr))
    return out


def hf_folder() -> str:
    """The fp32 safetensors folder kiln makes from SmolLM2's GGUF: the checkpoint transformers loads."""
    from kiln.models import _gguf_cache_folder, builtin_gguf, load_gguf

    gguf = builtin_gguf("smollm2-135m")
    folder = _gguf_cache_folder(gguf)
    if not os.path.exists(os.path.join(folder, "config.json")):
        load_gguf(gguf)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--artifact", default=None, help="a SmolLM2-135M CPU artifact (default: build it)")
    ap.add_argument("--gpu", metavar="ARTIFACT_DIR", default=None, help="GPU cold start of this weightless artifact")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="with --gpu: cpu tests the code path")
    ap.add_argument("--work", default=None, help="with --gpu: local folder for the weights (default: $TMPDIR)")
    ap.add_argument(
        "--results",
        default=None,
        help="with --gpu: the JSON file to merge into (default: bench/results/cold_start.json)",
    )
    ap.add_argument("--ways", default=None, help="with --gpu: comma-separated ways to time (default: all)")
    a = ap.parse_args()
    if a.gpu:
        from cold_start_gpu import run_gpu
        from results_io import RESULTS

        only = [w for w in a.ways.split(",") if w] if a.ways else None
        run_gpu(a.gpu, a.runs, a.device, a.work, a.results or os.path.join(RESULTS, "cold_start.json"), only)
        return
    art = a.artifact or default_artifact()
    from kiln.bundle import make_bundle

    tmp = tempfile.mkdtemp(prefix="kiln-cold-")
    try:
        t = time.perf_counter()
        info = make_bundle(art, os.path.join(tmp, "bundle"), tar=False)
        bundle_s = time.perf_counter() - t
        run = os.path.join(info.path, "run")
        ask = ["--prompt", PROMPT, "--max-tokens", "1"]
        clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "KILN_PYTHON": sys.executable}
        ways = {
            "bundle": ([run, *ask], clean),
            "bundle_no_verify": ([run, *ask, "--no-verify"], clean),
            "install": ([sys.executable, "-m", "kiln.cli", "run", art, *ask], None),
            "install_no_verify": ([sys.executable, "-m", "kiln.cli", "run", art, *ask, "--no-verify"], None),
            "transformers": ([sys.executable, "-c", _HF, hf_folder(), PROMPT], None),
        }
        times: dict[str, list[float]] = {k: [] for k in ways}
        load_before = os.getloadavg()[0]
        order = list(ways)
        for r in range(a.runs):
            # rotated every run, so that each way follows each other way equally often: a start right after
            # the transformers process (1.3 GB freed, every core busy a moment before) is slower, whatever it is
            for k in order[r % len(order) :] + order[: r % len(order)]:
                cmd, env = ways[k]
                times[k].append(first_token_seconds(cmd, env))
        med = {k: round(statistics.median(v), 3) for k, v in times.items()}
        print(f"{'way':<20} {'first token (s)':>16} {'vs transformers':>16}")
        for k, v in med.items():
            print(f"{k:<20} {v:>16.2f} {med['transformers'] / v:>15.1f}x")
        print(f"bundle: runtime {info.bytes_runtime / 1e6:.1f} MB + artifact {info.bytes_artifact / 1e6:.1f} MB")
        write_results(
            "cold_start",
            {
                "model": "smollm2-135m (fp32, O1)",
                "prompt": PROMPT,
                "runs": a.runs,
                "statistic": "median over runs, page cache warm after the first",
                "cpu_first_token_s": med["bundle"],
                "cpu_first_token_no_verify_s": med["bundle_no_verify"],
                "install_first_token_s": med["install"],
                "install_first_token_no_verify_s": med["install_no_verify"],
                "transformers_first_token_s": med["transformers"],
                "all_runs_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "bundle_runtime_mb": round(info.bytes_runtime / 1e6, 1),
                "bundle_artifact_mb": round(info.bytes_artifact / 1e6, 1),
                "bundle_make_s": round(bundle_s, 1),
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "python": sys.version.split()[0],
            },
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
