"""Columnar (Parquet-friendly) storage of per-image panoptic statistics: one row per image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import numpy as np
import pyarrow as pa

from eco_ray.metrics.panoptic import PanopticStats

_TYPES = {"iou_sum": pa.float64()}


def stats_to_arrow(image_ids: Sequence[int], stats: PanopticStats) -> pa.Table:
    """``stats`` of shape (N, ..., C) -> a table with column ``image_id`` and one fixed-size list column
    per statistic (the trailing dimensions flattened; their shape is kept in the schema metadata)."""
    n = len(image_ids)
    if stats.tp.shape[0] != n:
        raise ValueError(f"{n} image ids for {stats.tp.shape[0]} rows of statistics")
    inner_shape = stats.tp.shape[1:]
    columns = {"image_id": pa.array(np.asarray(image_ids, dtype=np.int64))}
    for f in fields(PanopticStats):
        values = getattr(stats, f.name).reshape(n, int(np.prod(inner_shape)))  # also for an empty split
        typ = _TYPES.get(f.name, pa.int64())
        flat = pa.array(values.reshape(-1), type=typ)
        columns[f.name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    meta = {b"eco_ray.stats_shape": ",".join(map(str, inner_shape)).encode()}
    return pa.table(columns).replace_schema_metadata(meta)


def stats_from_arrow(table: pa.Table) -> tuple[np.ndarray, PanopticStats]:
    shape_text = (table.schema.metadata or {}).get(b"eco_ray.stats_shape")
    if shape_text is None:
        raise ValueError("table has no eco_ray.stats_shape metadata: not written by stats_to_arrow")
    inner_shape = tuple(int(x) for x in shape_text.decode().split(","))
    n = table.num_rows
    arrays = {}
    for f in fields(PanopticStats):
        col = table.column(f.name).combine_chunks()
        arrays[f.name] = col.values.to_numpy(zero_copy_only=False).reshape((n, *inner_shape))
    return table.column("image_id").to_numpy(), PanopticStats(**arrays)
