"""Where the benchmarks write their figures: bench/results/NAME.json, with the machine, date and commit."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    """CPU model, cores and memory of this host (and the GPU when torch sees one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f", {int(f.readline().split()[1]) / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    out = f"{cpu}, {len(os.sched_getaffinity(0))} cores{mem}"
    try:
        import torch

        if torch.cuda.is_available():
            out += f"; {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return out


def commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True).strip()
        dirty = subprocess.check_output(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, text=True
        ).strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(name: str, figures: dict[str, Any], on: str | None = None) -> str:
    """Write bench/results/NAME.json: {machine, date, commit, **figures}; returns the path. `on`: the machine the
    figures come from, in words, when it is not this one (a GPU host's run summarized here)."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    doc = {"machine": on or machine(), "date": datetime.date.today().isoformat(), "commit": commit(), **figures}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}")
    return path
