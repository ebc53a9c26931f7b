"""Per-vertex scores, computed as the Algonauts 2023 devkit does (SPEC "Scores")."""

from __future__ import annotations

import numpy as np

# The devkit replaces a noise ceiling of exactly 0 with this before dividing.
ZERO_CEILING = 1e-14


def pearson_r(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r per column of two (n_samples, n_vertices) arrays.

    A column with zero variance in either array has no defined r; it scores 0,
    so a constant predictor is worth nothing rather than NaN.
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    p = p - p.mean(0)
    t = t - t.mean(0)
    denom = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    num = (p * t).sum(0)
    return np.divide(num, denom, out=np.zeros_like(num), where=denom > 0)


def r2_score(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Coefficient of determination 1 - SSE/SST per column (0 where SST is 0)."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    sse = ((t - p) ** 2).sum(0)
    sst = ((t - t.mean(0)) ** 2).sum(0)
    return np.divide(sst - sse, sst, out=np.zeros_like(sse), where=sst > 0)


def noise_normalized_accuracy(r: np.ndarray, noise_ceiling: np.ndarray) -> np.ndarray:
    """Devkit score per vertex in percent: max(r, 0)^2 / ceiling * 100, clipped at 100.

    `noise_ceiling` is a fraction in [0, 1]; a ceiling of exactly 0 becomes 1e-14.
    """
    nc = np.where(np.asarray(noise_ceiling, dtype=np.float64) == 0, ZERO_CEILING, noise_ceiling)
    return np.minimum(np.maximum(r, 0) ** 2 / nc * 100, 100)
