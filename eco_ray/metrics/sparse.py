"""Per-image panoptic statistics stored only where they are non-zero (pure numpy, no Ray).

An image holds a handful of the dataset's categories (COCO: ~11 segments of 133 categories), so the dense
(image, ..., category) arrays of :class:`~eco_ray.metrics.panoptic.PanopticStats` are mostly zeros: ~64 KB
per image at 133 categories, 2 views and 5 exits. :class:`SparseStats` keeps one entry per (image,
category) pair that is non-zero anywhere in the image's inner cells (views, exits), in CSR order (images
ascending, then categories ascending), with every inner cell of that pair::

    offsets   (N + 1,) int64    entries of image i are offsets[i]:offsets[i + 1]
    category  (nnz,)   int32
    values    name -> (nnz, *inner)   iou_sum float64; the counts int32 where every value fits, else int64

Exactness. Every dataset-level total is a sum over images, per category. The dense path sums the rows in
image order (numpy reduces a leading axis row by row); :meth:`SparseStats.totals` sums the same non-zero
values in the same order (``np.bincount`` adds its inputs in order) and skips only zeros, which leave a
float sum unchanged, so totals, PQ and mIoU equal the dense computation to the last bit. Per-image
quantities (per-image PQ, contributions to the dataset PQ) are computed on dense blocks of images by the
same functions the dense path uses (:meth:`SparseStats.per_image`), so they are bit-identical too. iou_sum
stays float64: integer-scaled sums would be exact in any order, but would differ from every table derived
before in the last bits, and float64 costs 4 bytes more per cell than int32. (With a single category numpy
sums the dense column pairwise, so there the two agree to rounding only.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

from eco_ray.metrics.panoptic import PanopticStats

STAT_NAMES = tuple(f.name for f in fields(PanopticStats))
_INT32 = np.iinfo(np.int32)
_BLOCK_BYTES = 64 << 20  # the dense block a per-image computation works on


def narrow(name: str, values: np.ndarray) -> np.ndarray:
    """The stored dtype of a statistic: float64 for ``iou_sum``, int32 for counts that fit (else int64)."""
    if name == "iou_sum":
        return np.asarray(values, np.float64)
    values = np.asarray(values)
    if values.size == 0 or (values.min() >= _INT32.min and values.max() <= _INT32.max):
        return values.astype(np.int32)
    return values.astype(np.int64)


@dataclass
class SparseStats:
    """Panoptic statistics of shape (N, *inner, C), stored per non-zero (image, category) pair."""

    offsets: np.ndarray
    category: np.ndarray
    values: dict[str, np.ndarray]
    num_categories: int

    def __post_init__(self):
        n_entries = int(self.offsets[-1]) if len(self.offsets) else 0
        if len(self.offsets) == 0 or self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must start at 0 and never decrease")
        if self.category.shape != (n_entries,):
            raise ValueError(f"{n_entries} entries by the offsets, {self.category.shape[0]} in the category column")
        if set(self.values) != set(STAT_NAMES):
            raise ValueError(f"need the statistics {STAT_NAMES}, got {sorted(self.values)}")
        shapes = {v.shape for v in self.values.values()}
        if len(shapes) != 1 or next(iter(shapes))[:1] != (n_entries,):
            raise ValueError(f"every statistic must have shape ({n_entries}, *inner), got {sorted(shapes)}")

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def inner_shape(self) -> tuple[int, ...]:
        return self.values["tp"].shape[1:]

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense shape (N, *inner, C)."""
        return (len(self), *self.inner_shape, self.num_categories)

    @property
    def entries(self) -> int:
        return len(self.category)

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.category.nbytes + sum(v.nbytes for v in self.values.values()))

    @cached_property
    def image_index(self) -> np.ndarray:
        """(nnz,) the image (row) of every entry."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.offsets))

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_dense(cls, stats: PanopticStats) -> SparseStats:
        """The entries of dense (N, *inner, C) statistics that are non-zero in some inner cell."""
        n, c = stats.tp.shape[0], stats.tp.shape[-1]
        active = np.zeros((n, c), bool)
        for name in STAT_NAMES:
            active |= (getattr(stats, name) != 0).reshape(n, int(np.prod(stats.tp.shape[1:-1])), c).any(1)
        image, category = np.nonzero(active)  # row-major: images ascending, then categories
        offsets = np.zeros(n + 1, np.int64)
        offsets[1:] = np.cumsum(active.sum(1))
        return cls(offsets, category.astype(np.int32),
                   {name: narrow(name, getattr(stats, name)[image, ..., category]) for name in STAT_NAMES}, c)

    @classmethod
    def of(cls, stats: SparseStats | PanopticStats) -> SparseStats:
        return stats if isinstance(stats, SparseStats) else cls.from_dense(stats)

    def to_dense(self, start: int = 0, stop: int | None = None) -> PanopticStats:
        """Images ``start:stop`` as dense statistics (float64 / int64, as the dense path computes them)."""
        stop = len(self) if stop is None else stop
        return PanopticStats(**{name: self._dense_block(self.values[name], start, stop,
                                                        np.float64 if name == "iou_sum" else np.int64)
                                for name in STAT_NAMES})

    def _dense_block(self, values: np.ndarray, start: int, stop: int, dtype) -> np.ndarray:
        """Per-entry ``values`` (nnz, *inner) of images ``start:stop`` scattered into (stop - start, *inner, C)."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        block = np.zeros((stop - start, *values.shape[1:], self.num_categories), dtype)
        block[self.image_index[lo:hi] - start, ..., self.category[lo:hi]] = values[lo:hi]
        return block

    @classmethod
    def concat(cls, parts: Sequence[SparseStats]) -> SparseStats:
        if not parts:
            raise ValueError("nothing to concatenate")
        if len({(p.inner_shape, p.num_categories) for p in parts}) != 1:
            raise ValueError("parts of different shapes")
        offsets = [np.zeros(1, np.int64)]
        base = 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += p.entries
        values = {}
        for name in STAT_NAMES:
            arrays = [p.values[name] for p in parts]
            wide = any(a.dtype == np.int64 for a in arrays) and name != "iou_sum"
            values[name] = np.concatenate([a.astype(np.int64) if wide else a for a in arrays])
        return cls(np.concatenate(offsets), np.concatenate([p.category for p in parts]), values,
                   parts[0].num_categories)

    # ------------------------------------------------------------------ selection
    def take(self, rows: np.ndarray) -> SparseStats:
        """The images ``rows`` (a boolean mask or indices, any order), their entries copied."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise ValueError(f"a mask of {len(self)} images, got shape {rows.shape}")
            rows = np.flatnonzero(rows)
        rows = np.arange(len(self))[rows.astype(np.int64)]  # negative indices as numpy reads them
        starts, lengths = self.offsets[rows], np.diff(self.offsets)[rows]
        offsets = np.zeros(len(rows) + 1, np.int64)
        offsets[1:] = np.cumsum(lengths)
        # entry k of the result: starts[row] + (k - offsets[row]) for the row it falls in
        index = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(offsets[-1]), dtype=np.int64)
        return SparseStats(offsets, self.category[index], {n: v[index] for n, v in self.values.items()},
                           self.num_categories)

    def inner(self, index) -> SparseStats:
        """An inner selection applied to every entry, e.g. ``inner(0)`` the first view of (N, V, E, C), or
        ``inner((slice(None), [2, 3]))`` two exits. A plain index keeps numpy views (no copy)."""
        index = index if isinstance(index, tuple) else (index,)
        return SparseStats(self.offsets, self.category,
                           {n: v[(slice(None), *index)] for n, v in self.values.items()}, self.num_categories)

    # ------------------------------------------------------------------ totals (exact, any image subset)
    def totals(self, choice: np.ndarray | None = None) -> PanopticStats:
        """Sums over images, per category. With ``choice`` (N,) (inner shape (E,)): each image's row at its
        chosen index, summed -> (C,), the statistics of an exit assignment. Without: (*inner, C)."""
        if choice is None:
            cells = int(np.prod(self.inner_shape))
            out = {}
            for name in STAT_NAMES:
                flat = self.values[name].reshape(self.entries, cells)
                out[name] = np.stack([self._sum(name, flat[:, j]) for j in range(cells)]).reshape(
                    (*self.inner_shape, self.num_categories))
            return PanopticStats(**out)
        at = self._choice_per_entry(choice)
        entries = np.arange(self.entries)
        return PanopticStats(**{n: self._sum(n, self.values[n][entries, at]) for n in STAT_NAMES})

    def _choice_per_entry(self, choice: np.ndarray) -> np.ndarray:
        choice = np.asarray(choice, np.int64)
        if len(self.inner_shape) != 1:
            raise ValueError(f"an exit choice needs statistics of shape (N, E, C), got {self.shape}")
        if choice.shape != (len(self),):
            raise ValueError(f"need one exit index per image ({len(self)}), got shape {choice.shape}")
        if choice.size and (choice.min() < 0 or choice.max() >= self.inner_shape[0]):
            raise ValueError(f"exit indices must be in [0, {self.inner_shape[0]})")
        return choice[self.image_index]

    def _sum(self, name: str, values: np.ndarray) -> np.ndarray:
        # bincount adds in input order (images ascending): the dense row-by-row sum, zeros skipped
        total = np.bincount(self.category, weights=values.astype(np.float64, copy=False),
                            minlength=self.num_categories)
        return total if name == "iou_sum" else np.rint(total).astype(np.int64)  # counts < 2**53: exact

    def weighted_totals(self, weights: np.ndarray, choice: np.ndarray | None = None,
                        names: Sequence[str] = STAT_NAMES, values: dict[str, np.ndarray] | None = None
                        ) -> dict[str, np.ndarray]:
        """Per-image statistics weighted by (B, N) weights (bootstrap counts) and summed -> name: (B, C)
        with ``choice`` (each image's chosen exit), else (B, *inner, C). Dense blocks of images times the
        weights (one matrix product per block): the counts exact (float64 holds them), the IoU sums to
        rounding. ``values`` replaces the statistics by other per-entry arrays of the same layout (e.g. one
        combination of counts), summed alike; ``names`` picks which."""
        w = np.asarray(weights, np.float64)
        n = len(self)
        if w.ndim != 2 or w.shape[1] != n:
            raise ValueError(f"weights must have shape (resamples, {n}), got {w.shape}")
        source = self.values if values is None else values
        if choice is not None:
            at = self._choice_per_entry(choice)
            entries = np.arange(self.entries)
            chosen = {k: source[k][entries, at] for k in names}
        else:
            chosen = {k: source[k] for k in names}
        inner = chosen[names[0]].shape[1:]
        cells = int(np.prod(inner)) * self.num_categories
        out = {name: np.zeros((w.shape[0], cells)) for name in names}
        step = max(1, _BLOCK_BYTES // (8 * max(cells, 1)))
        for start in range(0, n, step):
            stop = min(n, start + step)
            for name in names:
                block = self._dense_block(chosen[name], start, stop, np.float64)
                out[name] += w[:, start:stop] @ block.reshape(stop - start, cells)
        shape = (w.shape[0], *inner, self.num_categories)
        return {name: (v if chosen[name].dtype.kind == "f" else np.rint(v).astype(np.int64)).reshape(shape)
                for name, v in out.items()}

    # ------------------------------------------------------------------ per-image quantities
    def per_image(self, fn: Callable[[PanopticStats], np.ndarray]) -> np.ndarray:
        """``fn`` (a per-image function of dense statistics, images on axis 0) over blocks of images,
        concatenated: what ``fn(self.to_dense())`` gives, without the whole dense array."""
        cells = int(np.prod(self.inner_shape)) * self.num_categories
        step = max(1, _BLOCK_BYTES // (8 * len(STAT_NAMES) * max(cells, 1)))
        parts = [fn(self.to_dense(start, min(len(self), start + step))) for start in range(0, len(self), step)]
        if not parts:
            return fn(self.to_dense(0, 0))
        return np.concatenate(parts)
