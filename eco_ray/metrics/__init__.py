"""Panoptic metrics as additive per-image statistics (pure numpy, no Ray)."""

from eco_ray.metrics.panoptic import (
    VOID,
    Category,
    CategorySet,
    PanopticInputError,
    PanopticResult,
    PanopticStats,
    aggregate,
    image_stats,
    per_image_pq,
)
from eco_ray.metrics.sparse import SparseStats
from eco_ray.metrics.table import stats_from_arrow, stats_to_arrow

__all__ = [
    "VOID", "Category", "CategorySet", "PanopticInputError", "PanopticResult", "PanopticStats", "SparseStats",
    "aggregate", "image_stats", "per_image_pq", "stats_from_arrow", "stats_to_arrow",
]
