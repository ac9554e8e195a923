"""COCO detection AP of any exit assignment, exact, from per-image matching records (numpy + pycocotools).

AP is not additive over images, but everything COCOeval computes before its accumulation step depends on one
image only: ``evaluateImg`` matches one image's detections of one category to its ground truth, per area
range and IoU threshold. So each (image, exit) is matched once (``match_images``, which runs pycocotools'
own ``evaluate``), its records are kept (``ImageMatches``: per detection its category, score and matched /
ignored flags; per category and area range the number of ground truths that count), and the AP of any
assignment of exits to images is the accumulation step alone on the chosen records (``assignment_ap``).

``accumulate`` is COCOeval.accumulate + summarize re-done in vectorised numpy on the concatenated records, in
COCOeval's order (images by ascending id, detections by a stable sort on score), so ties resolve as they do
there; the test holds it equal to a plain COCOeval on the chosen detections, for random assignments.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _params(iou_type: str = "bbox"):
    from pycocotools.cocoeval import Params

    return Params(iouType=iou_type)


@dataclass
class ImageMatches:
    """One image's COCOeval matching records at one exit: what the accumulation step reads.

    Detections are grouped by category index (ascending) and, within a category, in evaluateImg's order
    (stable sort on descending score), at most ``maxDets[-1]`` of them."""

    category: np.ndarray  # (D,) int: index into the sorted category ids
    score: np.ndarray  # (D,) float64
    matched: np.ndarray  # (A, T, D) bool: matched to a ground truth at IoU threshold t, in area range a
    ignored: np.ndarray  # (A, T, D) bool: ignored (matched to a crowd / ignored truth, or outside area range a)
    truth_count: np.ndarray  # (K, A) int: ground truths that count (not crowd, inside area range a)

    @classmethod
    def empty(cls, num_categories: int, areas: int = 4, thresholds: int = 10) -> ImageMatches:
        return cls(np.zeros(0, np.int64), np.zeros(0), np.zeros((areas, thresholds, 0), bool),
                   np.zeros((areas, thresholds, 0), bool), np.zeros((num_categories, areas), np.int64))


def match_images(ground_truth: Mapping, detections: Sequence[Mapping], image_ids: Sequence[int] | None = None,
                 iou_type: str = "bbox") -> dict[int, ImageMatches]:
    """Per-image matching records of ``detections`` (COCO result format: image_id, category_id, bbox, score)
    against ``ground_truth`` (a COCO instances document), by pycocotools' own ``COCOeval.evaluate``; for
    every image of ``image_ids`` (default: all of the document's), also those without detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = dict(ground_truth)
        gt.createIndex()
        ids = sorted(gt.getImgIds() if image_ids is None else set(int(i) for i in image_ids))
        cat_ids = sorted(gt.getCatIds())
        dets = [d for d in detections if int(d["image_id"]) in set(ids)]
        dt = gt.loadRes([dict(d) for d in dets]) if dets else COCO()
        if not dets:
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds, ev.params.catIds = ids, cat_ids
        ev.evaluate()
    p = ev._paramsEval
    n_img, n_area, n_thr = len(p.imgIds), len(p.areaRng), len(p.iouThrs)
    out = {}
    for i, image_id in enumerate(p.imgIds):
        cats, scores, matched, ignored = [], [], [], []
        truth = np.zeros((len(p.catIds), n_area), np.int64)
        for k in range(len(p.catIds)):
            per_area = [ev.evalImgs[k * n_area * n_img + a * n_img + i] for a in range(n_area)]
            if per_area[0] is None:
                continue
            for a, e in enumerate(per_area):
                truth[k, a] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            d = len(per_area[0]["dtScores"])
            cats.append(np.full(d, k, np.int64))
            scores.append(np.asarray(per_area[0]["dtScores"], np.float64))
            matched.append(np.stack([np.asarray(e["dtMatches"]).reshape(n_thr, d) != 0 for e in per_area]))
            ignored.append(np.stack([np.asarray(e["dtIgnore"]).reshape(n_thr, d).astype(bool) for e in per_area]))
        if cats:
            out[int(image_id)] = ImageMatches(np.concatenate(cats), np.concatenate(scores),
                                              np.concatenate(matched, 2), np.concatenate(ignored, 2), truth)
        else:
            out[int(image_id)] = ImageMatches.empty(len(p.catIds), n_area, n_thr)
    return out


def accumulate(records: Mapping[int, ImageMatches], iou_type: str = "bbox") -> dict[str, float]:
    """COCO's 12 summary numbers (AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l; -1 where undefined) of the
    images in ``records``, each with its own records: COCOeval.accumulate + summarize, vectorised."""
    p = _params(iou_type)
    ids = sorted(records)
    if not ids:
        raise ValueError("no images to evaluate")
    first = records[ids[0]]
    n_cat, n_area = first.truth_count.shape
    n_thr, n_rec, max_dets = len(p.iouThrs), len(p.recThrs), list(p.maxDets)
    parts = [records[i] for i in ids]
    category = np.concatenate([r.category for r in parts])
    score = np.concatenate([r.score for r in parts])
    matched = np.concatenate([r.matched for r in parts], 2)
    ignored = np.concatenate([r.ignored for r in parts], 2)
    truth = np.sum([r.truth_count for r in parts], axis=0)  # (K, A)
    # rank of each detection within its (image, category): the cut at maxDet is per image and category
    rank = np.concatenate([_rank_within_category(r.category) for r in parts])

    precision = -np.ones((n_thr, n_rec, n_cat, n_area, len(max_dets)))
    recall = -np.ones((n_thr, n_cat, n_area, len(max_dets)))
    for k in range(n_cat):
        of_k = category == k
        for m, max_det in enumerate(max_dets):
            keep = np.flatnonzero(of_k & (rank < max_det))
            order = keep[np.argsort(-score[keep], kind="mergesort")]
            for a in range(n_area):
                npig = truth[k, a]
                if npig == 0:
                    continue
                dtm, dt_ig = matched[a][:, order], ignored[a][:, order]
                tp_sum = np.cumsum(dtm & ~dt_ig, axis=1).astype(float)
                fp_sum = np.cumsum(~dtm & ~dt_ig, axis=1).astype(float)
                nd = tp_sum.shape[1]
                rc = tp_sum / npig
                pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                recall[:, k, a, m] = rc[:, -1] if nd else 0
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # the precision envelope
                for t in range(n_thr):
                    q = np.zeros(n_rec)
                    at = np.searchsorted(rc[t], p.recThrs, side="left")
                    valid = at < nd
                    q[valid] = pr[t, at[valid]]
                    precision[t, :, k, a, m] = q
    return _summarize(precision, recall, p)


def _rank_within_category(category: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal categories (records are grouped by category)."""
    if category.size == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, category[1:] != category[:-1]])
    lengths = np.diff(np.r_[starts, category.size])
    return np.arange(category.size) - np.repeat(starts, lengths)


def _summarize(precision: np.ndarray, recall: np.ndarray, p) -> dict[str, float]:
    labels, dets = list(p.areaRngLbl), list(p.maxDets)

    def mean(s):
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1.0

    def ap(iou=None, area="all"):
        s = precision if iou is None else precision[np.where(iou == p.iouThrs)[0]]
        return mean(s[:, :, :, labels.index(area), dets.index(dets[-1])])

    def ar(max_det, area="all"):
        return mean(recall[:, :, labels.index(area), dets.index(max_det)])

    values = [ap(), ap(0.5), ap(0.75), ap(area="small"), ap(area="medium"), ap(area="large"),
              ar(dets[0]), ar(dets[1]), ar(dets[2]), ar(dets[2], "small"), ar(dets[2], "medium"),
              ar(dets[2], "large")]
    return dict(zip(STAT_NAMES, values))


def assignment_ap(records_per_exit: Mapping[int, Mapping[int, ImageMatches]], exit_of: Mapping[int, int],
                  iou_type: str = "bbox") -> dict[str, float]:
    """COCO AP when image ``i`` is answered at exit ``exit_of[i]``: its records at that exit, accumulated."""
    try:
        chosen = {i: records_per_exit[k][i] for i, k in exit_of.items()}
    except KeyError as e:
        raise ValueError(f"no matching records for {e.args[0]!r} (an exit or an image the table lacks)") from None
    return accumulate(chosen, iou_type)


def coco_eval(ground_truth: Mapping, detections: Sequence[Mapping], image_ids: Sequence[int] | None = None,
              iou_type: str = "bbox") -> dict[str, float]:
    """A plain pycocotools COCOeval (evaluate, accumulate, summarize): the reference ``accumulate`` meets."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dict(ground_truth)
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_NAMES, (float(x) for x in ev.stats)))
