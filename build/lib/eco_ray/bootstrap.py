"""Bootstrap over images for dataset-level PQ, exact and vectorised (Ray-free).

A resample is a vector of counts (how often each image is drawn), so the resampled dataset's statistics
are one weighted sum of the per-image rows: no rows are copied, and thousands of resamples are one matrix
product. The per-image statistics are counts (TP, FP, FN, pixel counts) and summed IoUs, so the weighted
sums are the same totals that summing the drawn rows one by one gives (exact for the counts; the IoU sums to
floating-point rounding).
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from eco_ray.metrics.panoptic import PanopticStats


def resample_counts(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, n) int64: how often each of ``n`` images is drawn in each resample (n draws with
    replacement, uniform)."""
    if n < 1 or resamples < 1:
        raise ValueError(f"need at least one image and one resample, got n={n}, resamples={resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.int64)


def weighted_totals(stats: PanopticStats, weights: np.ndarray) -> PanopticStats:
    """Per-image statistics (N, ..., C) weighted by (B, N) counts -> (B, ..., C) totals."""
    w = np.asarray(weights, dtype=np.float64)
    n = stats.tp.shape[0]
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"weights must have shape (resamples, {n}), got {w.shape}")
    out = {}
    for f in fields(PanopticStats):
        a = getattr(stats, f.name)
        total = w @ a.reshape(n, -1).astype(np.float64)  # float64 holds integer counts exactly (< 2**53)
        total = total.reshape((w.shape[0], *a.shape[1:]))
        out[f.name] = total if a.dtype.kind == "f" else np.rint(total).astype(np.int64)
    return PanopticStats(**out)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap samples."""
    lo, hi = np.percentile(np.asarray(samples, dtype=np.float64), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
