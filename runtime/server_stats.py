"""The request figures `Server.metrics` reports, from the records of finished requests."""

from __future__ import annotations

from typing import Any

import numpy as np


def finished_stats(finished: Any, t_first: float | None, t_last: float | None) -> dict:
    """Counts, throughput and latency percentiles over finished-request records (dicts with
    finish_reason, output_tokens, ttft_s, tpot_s); t_first / t_last: first arrival and last finish."""
    fin = list(finished)
    ok = [f for f in fin if f["finish_reason"] in ("stop", "length")]
    out_tok = sum(f["output_tokens"] for f in fin)
    wall = (t_last - t_first) if t_first and t_last else 0.0
    ttft = np.array([f["ttft_s"] for f in ok if f["ttft_s"] is not None])
    tpot = np.array([f["tpot_s"] for f in ok if f["tpot_s"] is not None])

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q)) if a.size else None

    return {
        "requests_finished": len(ok),
        "requests_failed": sum(f["finish_reason"] == "error" for f in fin),
        "requests_cancelled": sum(f["finish_reason"] == "cancelled" for f in fin),
        "output_tokens": out_tok,
        "wall_s": wall,
        "tokens_per_s": out_tok / wall if wall > 0 else None,
        "ttft_mean_s": float(ttft.mean()) if ttft.size else None,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tpot_mean_s": float(tpot.mean()) if tpot.size else None,
        "tpot_p99_s": pct(tpot, 99),
    }
