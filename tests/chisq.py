"""Chi-square goodness of fit for the sampling tests: observed token counts against a distribution."""

from __future__ import annotations

import numpy as np


def chi2(counts: np.ndarray, expected_p: np.ndarray) -> tuple[float, int]:
    """(statistic, degrees of freedom); tokens expected fewer than 5 times are pooled into one cell."""
    n = counts.sum()
    big = expected_p * n >= 5
    e = np.append(expected_p[big] * n, expected_p[~big].sum() * n)
    o = np.append(counts[big], counts[~big].sum())
    keep = e > 0
    return float(((o[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


def critical(df: int, z: float = 3.72) -> float:
    """Wilson-Hilferty: the chi-square quantile for a one-sided p of 1e-4 (z = 3.72)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
