"""Panoptic quality as additive per-image statistics.

The currency of Steps B and C: for every image (and later every exit) we keep, per category,
the COCO panoptic matching statistics (sum of IoU over matched pairs, TP, FP, FN) and the semantic
intersection/union pixel counts. All of them are additive over images, so the dataset-level PQ and
mIoU of ANY subset or per-image choice of predictions is exact arithmetic over a table: no second
pass over the images.

Matching follows the COCO panoptic evaluation (panopticapi ``pq_compute``):
- a predicted and a ground-truth segment of the same category match when IoU > 0.5, where the
  union leaves out the part of the prediction that lies on void (unlabelled) pixels;
- ground-truth crowd segments are never matched and never count as false negatives;
- an unmatched prediction is not a false positive when more than half of it lies on void pixels
  plus crowd regions of its own category.
One generalisation: COCO has at most one crowd segment per category and image; if there are
several, their areas are pooled (panopticapi would keep only the last one).
"""

from __future__ import annotations

import numbers

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

VOID = 0  # segment id 0 is unlabelled in the COCO panoptic format
_OFFSET = np.uint64(1 << 32)  # pairs (gt id, pred id) are packed into one uint64


class PanopticInputError(ValueError):
    """A prediction or ground truth that does not describe a valid panoptic segmentation."""


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    isthing: bool


def _category(c: Mapping) -> Category:
    """A category from its COCO entry, strictly typed: ``bool("0")`` would make every category a thing."""
    if not isinstance(c, Mapping):
        raise ValueError(f"a category is an object with id, name and isthing, got {c!r}")
    for key in ("id", "name", "isthing"):
        if key not in c:
            raise ValueError(f"category {dict(c)!r} has no {key!r}")
    cid, isthing = c["id"], c["isthing"]
    if isinstance(cid, bool) or not isinstance(cid, numbers.Integral):
        raise ValueError(f"category {c['name']!r}: id must be an integer, got {cid!r}")
    if not (isinstance(isthing, (bool, numbers.Integral)) and int(isthing) in (0, 1)):
        raise ValueError(f"category {c['name']!r}: isthing must be 0, 1, true or false, got {isthing!r}")
    return Category(int(cid), str(c["name"]), bool(isthing))


class CategorySet:
    """The categories of a dataset, with a contiguous index 0..C-1 used by every stats array."""

    def __init__(self, categories: Iterable[Category | Mapping]):
        cats = [c if isinstance(c, Category) else _category(c) for c in categories]
        if not cats:
            raise ValueError("a dataset needs at least one category")
        ids = [c.id for c in cats]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate category ids: {sorted(ids)}")
        if VOID in ids:
            raise ValueError("category id 0 is reserved for void (unlabelled) pixels")
        self.categories: tuple[Category, ...] = tuple(cats)
        self.ids = np.array(ids, dtype=np.int64)
        self.isthing = np.array([c.isthing for c in cats], dtype=bool)
        self._index = {c.id: i for i, c in enumerate(cats)}

    def __len__(self) -> int:
        return len(self.categories)

    def __contains__(self, category_id: int) -> bool:
        return int(category_id) in self._index

    def index(self, category_id: int) -> int:
        try:
            return self._index[int(category_id)]
        except (KeyError, TypeError, ValueError):
            raise PanopticInputError(f"unknown category id {category_id}; known: {sorted(self._index)}") from None

    def to_coco(self) -> list[dict]:
        return [{"id": c.id, "name": c.name, "isthing": int(c.isthing), "supercategory": "thing" if c.isthing else "stuff"}
                for c in self.categories]


@dataclass
class PanopticStats:
    """Additive statistics, arrays of shape (..., C). Leading dimensions are free (images, exits...)."""

    iou_sum: np.ndarray  # float64, summed IoU of matched segment pairs
    tp: np.ndarray  # int64
    fp: np.ndarray  # int64
    fn: np.ndarray  # int64
    sem_inter: np.ndarray  # int64, semantic intersection pixels (void excluded)
    sem_union: np.ndarray  # int64, semantic union pixels (void excluded)

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> PanopticStats:
        return cls(np.zeros(shape, np.float64), *(np.zeros(shape, np.int64) for _ in range(5)))

    @classmethod
    def stack(cls, items: Sequence[PanopticStats]) -> PanopticStats:
        return cls(**{f.name: np.stack([getattr(s, f.name) for s in items]) for f in fields(cls)})

    def __getitem__(self, index) -> PanopticStats:
        return PanopticStats(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def sum(self) -> PanopticStats:
        """Sum over every leading dimension, leaving shape (C,)."""
        c = self.tp.shape[-1]
        return PanopticStats(**{f.name: getattr(self, f.name).reshape(-1, c).sum(0) for f in fields(self)})

    def sum_images(self) -> PanopticStats:
        """Sum over the first (image) axis only: (N, ..., C) -> (..., C)."""
        return PanopticStats(**{f.name: getattr(self, f.name).sum(0) for f in fields(self)})

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PanopticResult:
    pq: float
    sq: float
    rq: float
    pq_things: float
    sq_things: float
    rq_things: float
    pq_stuff: float
    sq_stuff: float
    rq_stuff: float
    miou: float
    per_class_pq: np.ndarray  # (C,), NaN where a category has no segment at all
    per_class_iou: np.ndarray  # (C,), NaN where a category has no pixel at all

    def summary(self) -> dict[str, float]:
        keys = ("pq", "sq", "rq", "pq_things", "sq_things", "rq_things", "pq_stuff", "sq_stuff", "rq_stuff", "miou")
        return {k: float(getattr(self, k)) for k in keys}


def image_stats(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Mapping],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Mapping],
    categories: CategorySet,
) -> PanopticStats:
    """Statistics of one image. ``*_ids`` are (H, W) integer segment-id maps (0 = void);
    segments are dicts with ``id`` and ``category_id`` (and ``iscrowd`` for ground truth)."""
    gt_ids = np.asarray(gt_ids)
    pred_ids = np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape or gt_ids.ndim != 2:
        raise PanopticInputError(f"id maps must be 2-D and of one shape, got {gt_ids.shape} and {pred_ids.shape}")
    gt_cat = {int(s["id"]): categories.index(s["category_id"]) for s in gt_segments}
    gt_crowd = {int(s["id"]) for s in gt_segments if s.get("iscrowd", 0)}
    pred_cat = {int(s["id"]): categories.index(s["category_id"]) for s in pred_segments}
    if VOID in gt_cat or VOID in pred_cat:
        raise PanopticInputError("segment id 0 is reserved for void")

    gt_flat = gt_ids.reshape(-1).astype(np.uint64)
    pred_flat = pred_ids.reshape(-1).astype(np.uint64)
    gt_area = _areas(gt_flat)
    pred_area = _areas(pred_flat)
    for name, area, known in (("ground truth", gt_area, gt_cat), ("prediction", pred_area, pred_cat)):
        unknown = sorted(set(area) - known.keys() - {VOID})
        if unknown:
            raise PanopticInputError(f"{name} id map has segment ids {unknown[:10]} with no segment info")
    pairs, counts = np.unique(gt_flat * _OFFSET + pred_flat, return_counts=True)
    inter = {(int(p // _OFFSET), int(p % _OFFSET)): int(n) for p, n in zip(pairs, counts)}

    stats = PanopticStats.zeros((len(categories),))
    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (g, p), n in inter.items():
        if g == VOID or p == VOID or g in gt_crowd or gt_cat[g] != pred_cat[p]:
            continue
        union = pred_area[p] + gt_area[g] - n - inter.get((VOID, p), 0)
        iou = n / union
        if iou > 0.5:
            c = gt_cat[g]
            stats.tp[c] += 1
            stats.iou_sum[c] += iou
            gt_matched.add(g)
            pred_matched.add(p)

    crowd_by_cat: dict[int, list[int]] = {}
    for g in gt_area:
        if g == VOID or g in gt_matched:
            continue
        if g in gt_crowd:
            crowd_by_cat.setdefault(gt_cat[g], []).append(g)
        else:
            stats.fn[gt_cat[g]] += 1
    for p in pred_area:
        if p == VOID or p in pred_matched:
            continue
        c = pred_cat[p]
        ignored = inter.get((VOID, p), 0) + sum(inter.get((g, p), 0) for g in crowd_by_cat.get(c, ()))
        if ignored / pred_area[p] > 0.5:
            continue
        stats.fp[c] += 1

    _semantic_counts(gt_ids, gt_cat, pred_ids, pred_cat, len(categories), stats)
    return stats


def _areas(flat_ids: np.ndarray) -> dict[int, int]:
    ids, counts = np.unique(flat_ids, return_counts=True)
    return {int(i): int(n) for i, n in zip(ids, counts)}


def _semantic_counts(gt_ids, gt_cat, pred_ids, pred_cat, num_categories, stats: PanopticStats) -> None:
    """Per-category pixel intersection and union of the semantic maps; void ground truth is ignored."""
    gt_sem = _to_semantic(gt_ids, gt_cat)
    pred_sem = _to_semantic(pred_ids, pred_cat)
    valid = gt_sem >= 0
    gt_sem, pred_sem = gt_sem[valid], pred_sem[valid]
    gt_count = np.bincount(gt_sem, minlength=num_categories)
    pred_count = np.bincount(pred_sem[pred_sem >= 0], minlength=num_categories)
    both = pred_sem == gt_sem
    inter_count = np.bincount(gt_sem[both], minlength=num_categories)
    stats.sem_inter += inter_count
    stats.sem_union += gt_count + pred_count - inter_count


def _to_semantic(ids: np.ndarray, cat: Mapping[int, int]) -> np.ndarray:
    """Category index per pixel, -1 for void."""
    lookup_ids = np.array([VOID, *cat.keys()], dtype=np.int64)
    lookup_cat = np.array([-1, *cat.values()], dtype=np.int64)
    order = np.argsort(lookup_ids)
    pos = np.searchsorted(lookup_ids[order], ids.astype(np.int64))
    return lookup_cat[order][pos]


def aggregate(stats: PanopticStats, categories: CategorySet) -> PanopticResult:
    """Dataset-level PQ/SQ/RQ (all, things, stuff) and mIoU from summed statistics (any leading shape)."""
    s = stats.sum()
    r = totals_summary(s, categories.isthing)
    denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
    with np.errstate(divide="ignore", invalid="ignore"):
        pq_c = np.where(denom > 0, s.iou_sum / np.where(denom > 0, denom, 1), np.nan)
        iou_c = np.where(s.sem_union > 0, s.sem_inter / np.maximum(s.sem_union, 1), np.nan)
    return PanopticResult(**{k: float(v) for k, v in r.items()}, per_class_pq=pq_c, per_class_iou=iou_c)


def _category_pq(stats: PanopticStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per category: (present: a segment in ground truth or prediction, PQ (0 where absent), tp + fp/2 + fn/2)."""
    denom = stats.tp + 0.5 * stats.fp + 0.5 * stats.fn
    present = denom > 0
    return present, np.where(present, stats.iou_sum / np.where(present, denom, 1), 0.0), denom


def totals_summary(totals: PanopticStats, isthing: np.ndarray) -> dict[str, np.ndarray]:
    """PQ / SQ / RQ (all, things, stuff) and mIoU of statistics that are ALREADY summed over images, for every
    leading index at once: (..., C) -> arrays of shape (...). A category counts where it has a segment in the
    ground truth or the prediction; a group with no such category scores 0 (as :func:`aggregate` reports).
    The bootstrap evaluates thousands of resampled totals with one call."""
    s = totals
    present, pq_c, denom = _category_pq(s)
    sq_c = np.where(s.tp > 0, s.iou_sum / np.maximum(s.tp, 1), 0.0)
    rq_c = np.where(present, s.tp / np.where(present, denom, 1), 0.0)
    isthing = np.asarray(isthing, dtype=bool)
    out = {}
    for suffix, group in (("", np.ones_like(isthing)), ("_things", isthing), ("_stuff", ~isthing)):
        m = present & group
        n = m.sum(-1)
        for name, values in (("pq", pq_c), ("sq", sq_c), ("rq", rq_c)):
            out[name + suffix] = np.where(n > 0, (values * m).sum(-1) / np.maximum(n, 1), 0.0)
    has_pixels = s.sem_union > 0
    n_iou = has_pixels.sum(-1)
    iou_c = np.where(has_pixels, s.sem_inter / np.maximum(s.sem_union, 1), 0.0)
    out["miou"] = np.where(n_iou > 0, iou_c.sum(-1) / np.maximum(n_iou, 1), 0.0)
    return out


def ground_truth_pq(totals: PanopticStats) -> np.ndarray:
    """PQ of statistics summed over a SUBSET of images (one kind's), averaged over the categories that have a
    ground-truth segment in it: (..., C) -> (...), the ground truth read at the first leading index (it is the
    same at every exit). Dataset PQ also counts a category that only a prediction names, which is right for the
    whole split but, on a subset, lets one stray prediction of a category the subset lacks add a zero to the
    mean and move the subset's PQ by 1/C."""
    _, pq_c, _ = _category_pq(totals)
    gt = (totals.tp + totals.fn).reshape(-1, totals.tp.shape[-1])[0] > 0
    if not gt.any():
        return np.zeros(pq_c.shape[:-1])
    return (pq_c * gt).sum(-1) / gt.sum()


def per_image_pq(stats: PanopticStats) -> np.ndarray:
    """PQ of each image alone: mean over the categories that occur in it (in ground truth or prediction).

    Works on any leading shape (..., C) -> (...). An image with no segment at all scores 1.0 (nothing
    to find, nothing predicted), which is the convention that makes its utility neutral."""
    present, pq_c, _ = _category_pq(stats)
    n = present.sum(-1)
    return np.where(n > 0, pq_c.sum(-1) / np.maximum(n, 1), 1.0)


def pq_contributions(stats: PanopticStats, reference: int = -1, totals: PanopticStats | None = None,
                     images: int | None = None) -> np.ndarray:
    """Each image's first-order contribution to the DATASET PQ at each exit, on the per-image-PQ scale.

    ``stats`` is (N, ..., E, C) with images on axis 0 and exits on axis -2; returns (N, ..., E). Dataset PQ is
    a ratio of sums, PQ = mean_c I_c / D_c (I_c summed IoU of matches, D_c = TP + FP/2 + FN/2, both summed
    over images). Around the assignment "every image at exit ``reference``", moving image i to exit e
    changes PQ by about (1/C) sum_c (i_iec - PQ_c d_iec) / D_c (minus the same at the reference); we return

        q[i, e] = PQ_ref + N/C * sum_c (i_iec - PQ_c * d_iec) / D_c,

    so that mean_i q[i, reference] = PQ_ref exactly, mean_i q[i, e] is the linearised dataset PQ of static
    exit e, and a per-image choice maximising sum_i q[i, e_i] maximises the linearised dataset PQ. Unlike
    per-image PQ it does not renormalise each image: an image with one segment that flips between matched
    and unmatched moves it by that segment's share of its category, not by 1.0. Sums over images are taken
    separately for every other leading axis (e.g. per view). ``totals`` (the (..., E, C) sums over the
    dataset's ``images`` images) lets a caller pass the dataset a block of its images belongs to."""
    iou = np.asarray(stats.iou_sum, dtype=np.float64)
    den = stats.tp + 0.5 * stats.fp + 0.5 * stats.fn
    if totals is None:
        n = iou.shape[0]
        ref_i = np.take(iou, [reference], axis=-2).sum(0)  # (..., 1, C)
        ref_d = np.take(den, [reference], axis=-2).sum(0)
    else:
        n = int(images)
        ref_i = np.take(np.asarray(totals.iou_sum, np.float64), [reference], axis=-2)
        ref_d = np.take(totals.tp + 0.5 * totals.fp + 0.5 * totals.fn, [reference], axis=-2)
    present = ref_d > 0
    pq_c = np.where(present, ref_i / np.where(present, ref_d, 1), 0.0)
    c = np.maximum(present.sum(-1, keepdims=True), 1)  # (..., 1, 1)
    pq_ref = (pq_c.sum(-1, keepdims=True) / c)[..., 0]  # (..., 1)
    term = np.where(present, (iou - pq_c * den) / np.where(present, ref_d, 1), 0.0)  # (N, ..., E, C)
    return pq_ref + n * term.sum(-1) / c[..., 0]
