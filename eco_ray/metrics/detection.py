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
import json
import math
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


def _ground_truth(document: Mapping):
    """A pycocotools COCO of a copy of ``document``: annotations renumbered 1, 2, ... (COCOeval records a
    match as the truth's id, so an id of 0 would read as unmatched), ``area`` and ``iscrowd`` filled in where a
    file leaves them out (the box's area, not a crowd); COCOeval's own additions never reach the caller's."""
    from pycocotools.coco import COCO

    anns = []
    for n, a in enumerate(document["annotations"]):
        w, h = a["bbox"][2], a["bbox"][3]
        anns.append({**a, "id": n + 1, "area": a.get("area", w * h), "iscrowd": a.get("iscrowd", 0)})
    gt = COCO()
    gt.dataset = {**document, "annotations": anns}
    gt.createIndex()
    return gt


def match_images(ground_truth: Mapping, detections: Sequence[Mapping], image_ids: Sequence[int] | None = None,
                 iou_type: str = "bbox") -> dict[int, ImageMatches]:
    """Per-image matching records of ``detections`` (COCO result format: image_id, category_id, bbox, score)
    against ``ground_truth`` (a COCO instances document), by pycocotools' own ``COCOeval.evaluate``; for
    every image of ``image_ids`` (default: all of the document's), also those without detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = _ground_truth(ground_truth)
        ids = sorted(gt.getImgIds() if image_ids is None else set(int(i) for i in image_ids))
        cat_ids = sorted(gt.getCatIds())
        wanted = set(ids)
        dets = [d for d in detections if int(d["image_id"]) in wanted]
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
    ids = sorted(records)
    if not ids:
        raise ValueError("no images to evaluate")
    parts = [records[i] for i in ids]
    return accumulate_arrays(np.concatenate([r.category for r in parts]), np.concatenate([r.score for r in parts]),
                             np.concatenate([_rank_within_category(r.category) for r in parts]),
                             np.concatenate([r.matched for r in parts], 2),
                             np.concatenate([r.ignored for r in parts], 2),
                             np.sum([r.truth_count for r in parts], axis=0), iou_type)


def accumulate_arrays(category: np.ndarray, score: np.ndarray, rank: np.ndarray, matched: np.ndarray,
                      ignored: np.ndarray, truth: np.ndarray, iou_type: str = "bbox") -> dict[str, float]:
    """``accumulate`` on records already concatenated in COCOeval's order (images by ascending id, each
    image's records grouped by category): ``rank`` is a detection's rank within its (image, category),
    ``matched`` / ``ignored`` are (A, T, D), ``truth`` is (K, A) summed over the images."""
    p = _params(iou_type)
    n_cat, n_area = truth.shape
    n_thr, n_rec, max_dets = len(p.iouThrs), len(p.recThrs), list(p.maxDets)

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
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = _ground_truth(ground_truth)
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_NAMES, (float(x) for x in ev.stats)))


def weighted_ap(category: np.ndarray, score: np.ndarray, rank: np.ndarray, exit: np.ndarray, image: np.ndarray,
                tp: np.ndarray, counted: np.ndarray, truth: np.ndarray, assign: np.ndarray,
                counts: np.ndarray | None = None, iou_type: str = "bbox", cells: int = 1 << 22) -> np.ndarray:
    """COCO AP (IoU .50:.95, all areas, 100 detections per image and category) of B assignments at once.

    The rows are detections in COCOeval's order (images by ascending id, each image's grouped by category):
    their ``category``, ``score``, ``rank`` within (image, category), ``exit`` and ``image`` indices, and for
    the area range "all" ``tp`` (T, R): matched and not ignored, ``counted`` (T, R): not ignored. Under
    assignment b, image n is answered at exit ``assign[b, n]`` and counts ``counts[b, n]`` times (default 1;
    a bootstrap resample's counts, or 0 to leave an image out); ``truth`` (N, K) is each image's ground truths
    that count. -> (B,) AP, -1 where no category has ground truth.

    An assignment with counts of 0 and 1 is exactly COCOeval on the images it counts, ties included: a row
    that weighs 0 repeats the point before it on the precision-recall curve, which changes no reading of the
    envelope. Counting an image w times is COCOeval on w copies of it where scores are distinct: the w copies
    of a detection are then adjacent in the sort with the same flags, and the envelope read at any recall
    between them is the one after the last copy (a score tied with another image's detection is taken in
    image order instead of after every image). ``cells`` bounds the work arrays' size."""
    p = _params(iou_type)
    rec, max_det = np.asarray(p.recThrs), p.maxDets[-1]
    assign = np.atleast_2d(assign)
    b_all, n_cat = assign.shape[0], truth.shape[1]
    counts = np.ones(assign.shape, np.float64) if counts is None else np.atleast_2d(counts).astype(np.float64)
    npig_all = counts @ truth.astype(np.float64)  # (B, K)
    per_cat = np.full((b_all, n_cat), np.nan)
    n_thr = tp.shape[0]
    for k in range(n_cat):
        keep = np.flatnonzero((category == k) & (rank < max_det))
        order = keep[np.argsort(-score[keep], kind="mergesort")]
        has = npig_all[:, k] > 0
        if order.size == 0:
            per_cat[has, k] = 0.0
            continue
        tp_k = tp[:, order].astype(np.float64)
        fp_k = (counted[:, order] & ~tp[:, order]).astype(np.float64)
        img_k, exit_k = image[order], exit[order]
        step = max(1, cells // (n_thr * order.size))
        for b0 in range(0, b_all, step):
            sl = slice(b0, min(b0 + step, b_all))
            w = counts[sl][:, img_k] * (assign[sl][:, img_k] == exit_k)  # (b, R)
            tc = np.cumsum(w[:, None, :] * tp_k[None], axis=2)  # (b, T, R)
            fc = np.cumsum(w[:, None, :] * fp_k[None], axis=2)
            npig = npig_all[sl, k]
            rc = tc / np.where(npig > 0, npig, 1.0)[:, None, None]
            pr = tc / (fc + tc + np.spacing(1))
            pr = np.maximum.accumulate(pr[..., ::-1], axis=2)[..., ::-1]
            nb, r = rc.shape[0], rc.shape[2]
            rc2, pr2 = rc.reshape(nb * n_thr, r), pr.reshape(nb * n_thr, r)
            at = np.stack([np.searchsorted(row, rec, side="left") for row in rc2])  # (b*T, 101)
            q = np.where(at < r, np.take_along_axis(pr2, np.minimum(at, r - 1), axis=1), 0.0)
            per_cat[sl, k] = np.where(npig > 0, q.reshape(nb, -1).mean(axis=1), np.nan)
    valid = ~np.isnan(per_cat)
    return np.where(valid.any(1), np.nansum(per_cat, 1) / np.maximum(valid.sum(1), 1), -1.0)


def label_blocks(n: int, block: int) -> list[np.ndarray]:
    """Image indices 0..n-1 cut into the fewest consecutive blocks of at most ``block``, of equal size to one
    image (300 images, block 256: two of 150; never a remnant of a few images measured on its own)."""
    return np.array_split(np.arange(n), max(1, math.ceil(n / block))) if n else []


@dataclass
class DetectionRecords:
    """The matching records of many images at every exit and view, flat: one row per detection (the derived
    table's form). Rows run by image (ascending id), view, exit, then in ``ImageMatches`` order, so that the
    rows of any exit assignment are already in COCOeval's order. A detection's matched / ignored flags over
    (area range, IoU threshold) are bits ``a * T + t`` of one integer. ``truth`` depends on the image only."""

    image_ids: np.ndarray  # (N,) ascending
    exits: list[int]
    views: int
    image: np.ndarray  # (R,) index into image_ids
    view: np.ndarray  # (R,)
    exit: np.ndarray  # (R,) index into exits
    category: np.ndarray  # (R,)
    score: np.ndarray  # (R,) float64
    matched: np.ndarray  # (R,) uint64 bits
    ignored: np.ndarray  # (R,) uint64 bits
    truth: np.ndarray  # (N, K, A) int

    @classmethod
    def from_matches(cls, per_view: Sequence[Mapping[int, Mapping[int, ImageMatches]]]) -> DetectionRecords:
        """``per_view[v][exit][image_id]``: every view holds the same exits and images."""
        exits = sorted(per_view[0])
        ids = sorted(per_view[0][exits[0]])
        cols: dict[str, list] = {k: [] for k in ("image", "view", "exit", "category", "score", "matched", "ignored")}
        truth = []
        for n, i in enumerate(ids):
            truth.append(per_view[0][exits[0]][i].truth_count)
            for v, view in enumerate(per_view):
                for e, k in enumerate(exits):
                    r = view[k][i]
                    d = r.score.size
                    cols["image"].append(np.full(d, n, np.int32))
                    cols["view"].append(np.full(d, v, np.int8))
                    cols["exit"].append(np.full(d, e, np.int8))
                    cols["category"].append(r.category.astype(np.int16))
                    cols["score"].append(r.score)
                    cols["matched"].append(_pack(r.matched))
                    cols["ignored"].append(_pack(r.ignored))
        flat = {k: np.concatenate(v) for k, v in cols.items()}
        return cls(np.asarray(ids, np.int64), exits, len(per_view), truth=np.stack(truth), **flat)

    def ap(self, choice: Sequence[int] | np.ndarray, view: int = 0, iou_type: str = "bbox",
           images: np.ndarray | None = None) -> dict[str, float]:
        """COCO's summary numbers when image n is answered at exit index ``choice[n]`` on ``view``, over all
        images or the boolean mask ``images``."""
        choice = np.asarray(choice)
        if choice.shape != self.image_ids.shape:
            raise ValueError(f"one exit index per image: {self.image_ids.size} images, got shape {choice.shape}")
        if choice.size and (choice.min() < 0 or choice.max() >= len(self.exits)):
            raise ValueError(f"exit indices must lie in 0..{len(self.exits) - 1}")
        keep_image = np.ones(self.image_ids.size, bool) if images is None else np.asarray(images, bool)
        if not keep_image.any():
            raise ValueError("no images to evaluate")
        rows = np.flatnonzero((self.view == view) & (self.exit == choice[self.image]) & keep_image[self.image])
        image, category = self.image[rows], self.category[rows].astype(np.int64)
        n_area, n_thr = self.truth.shape[2], len(_params(iou_type).iouThrs)
        new_run = np.r_[True, (image[1:] != image[:-1]) | (category[1:] != category[:-1])] if rows.size else \
            np.zeros(0, bool)
        starts = np.flatnonzero(new_run)
        rank = np.arange(rows.size) - np.repeat(starts, np.diff(np.r_[starts, rows.size]))
        return accumulate_arrays(category, self.score[rows], rank, _unpack(self.matched[rows], n_area, n_thr),
                                 _unpack(self.ignored[rows], n_area, n_thr), self.truth[keep_image].sum(0), iou_type)

    def __len__(self) -> int:
        return int(self.image_ids.size)

    def _rank(self, rows: np.ndarray) -> np.ndarray:
        """Each row's rank within its (image, view, exit, category) run: rows are stored in runs."""
        image, view, exit, category = self.image[rows], self.view[rows], self.exit[rows], self.category[rows]
        if rows.size == 0:
            return np.zeros(0, np.int64)
        new_run = np.r_[True, (image[1:] != image[:-1]) | (view[1:] != view[:-1]) | (exit[1:] != exit[:-1])
                        | (category[1:] != category[:-1])]
        starts = np.flatnonzero(new_run)
        return np.arange(rows.size) - np.repeat(starts, np.diff(np.r_[starts, rows.size]))

    def ap_of(self, assign: np.ndarray, counts: np.ndarray | None = None, view: int = 0,
              iou_type: str = "bbox") -> np.ndarray:
        """COCO AP of B exit assignments (exit indices, (B, N) or (N,)) on ``view`` at once, with images
        counted ``counts`` (B, N) times (a bootstrap resample; default once): ``weighted_ap``."""
        assign = np.atleast_2d(np.asarray(assign))
        if assign.shape[1] != self.image_ids.size:
            raise ValueError(f"one exit index per image: {self.image_ids.size} images, got shape {assign.shape}")
        if counts is not None and np.shape(np.atleast_2d(counts)) != assign.shape:
            raise ValueError(f"counts must have the assignments' shape {assign.shape}, got {np.shape(counts)}")
        if assign.size and (assign.min() < 0 or assign.max() >= len(self.exits)):
            raise ValueError(f"exit indices must lie in 0..{len(self.exits) - 1}")
        # only the rows some assignment can pick: the others would weigh 0 everywhere (one assignment under many
        # resamples, the bootstrap's case, picks one exit's rows per image)
        picked = self.exit == assign[0][self.image] if len(assign) and (assign == assign[0]).all() else \
            np.isin(self.exit, np.unique(assign))
        rows = np.flatnonzero((self.view == view) & picked)
        return self._weighted(rows, assign, counts, iou_type)

    def _weighted(self, rows: np.ndarray, assign: np.ndarray, counts: np.ndarray | None, iou_type: str,
                  image_offset: int = 0) -> np.ndarray:
        n_thr = len(_params(iou_type).iouThrs)
        flags = _unpack(self.matched[rows], self.truth.shape[2], n_thr)[0]  # area range "all"
        ignored = _unpack(self.ignored[rows], self.truth.shape[2], n_thr)[0]
        n = assign.shape[1]
        return weighted_ap(self.category[rows].astype(np.int64), self.score[rows], self._rank(rows),
                           self.exit[rows].astype(np.int64), self.image[rows].astype(np.int64) - image_offset,
                           flags & ~ignored, ~ignored, self.truth[image_offset:image_offset + n, :, 0], assign,
                           counts, iou_type)

    def per_image_ap(self, iou_type: str = "bbox") -> np.ndarray:
        """(N, V, E) each image's own AP at each exit and view (0 where it has no ground truth that counts)."""
        n, e = self.image_ids.size, len(self.exits)
        out = np.zeros((n, self.views, e))
        bounds = np.searchsorted(self.image, np.arange(n + 1))  # rows are stored by image
        every_exit = np.arange(e)[:, None]
        for i in range(n):
            rows = np.arange(bounds[i], bounds[i + 1])
            for v in range(self.views):
                out[i, v] = self._weighted(rows[self.view[rows] == v], every_exit, None, iou_type, image_offset=i)
        return np.maximum(out, 0.0)

    def contributions(self, block: int = 256, iou_type: str = "bbox") -> np.ndarray:
        """(N, V, E) each image's linearised contribution to the dataset AP: the AP of its block with the image
        moved from the deepest exit to exit k, minus the block's AP at the deepest exit, times the block's size
        (0 at the deepest exit). The images, by id, are cut into ``label_blocks(N, block)``: as few blocks as
        keep each at most ``block`` images, all of (nearly) the same size. Blocks keep the cost linear in the
        images; the AP of a few hundred images is what the label was measured on (docs/results.md)."""
        n, e = self.image_ids.size, len(self.exits)
        out = np.zeros((n, self.views, e))
        deepest = e - 1
        for idx in label_blocks(n, block):
            start, m = int(idx[0]), idx.size
            rows = np.arange(*np.searchsorted(self.image, [start, start + m]))  # rows are stored by image
            for j in range(deepest):
                assign = np.full((m + 1, m), deepest)
                assign[np.arange(1, m + 1), np.arange(m)] = j  # row 0: the whole block at the deepest exit
                for v in range(self.views):
                    picked = rows[(self.view[rows] == v) & np.isin(self.exit[rows], (j, deepest))]
                    ap = self._weighted(picked, assign, None, iou_type, image_offset=start)
                    out[start:start + m, v, j] = (ap[1:] - ap[0]) * m
        return out

    def take(self, mask: np.ndarray) -> DetectionRecords:
        """The records of the images where ``mask`` is true (a boolean mask over ``image_ids``)."""
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != self.image_ids.shape:
            raise ValueError(f"take needs a boolean mask of {self.image_ids.size} images, got {mask.dtype} "
                             f"{mask.shape}")
        new_index = np.cumsum(mask) - 1
        rows = mask[self.image]
        return DetectionRecords(self.image_ids[mask], list(self.exits), self.views,
                                new_index[self.image[rows]].astype(self.image.dtype), self.view[rows],
                                self.exit[rows], self.category[rows], self.score[rows], self.matched[rows],
                                self.ignored[rows], self.truth[mask])

    def with_exits(self, exits: Sequence[int]) -> DetectionRecords:
        """The same images with only ``exits`` (a subset of this table's)."""
        idx = [self.exits.index(k) for k in exits]
        remap = np.full(len(self.exits), -1, np.int64)
        remap[idx] = np.arange(len(idx))
        rows = remap[self.exit] >= 0
        return DetectionRecords(self.image_ids, list(exits), self.views, self.image[rows], self.view[rows],
                                remap[self.exit[rows]].astype(self.exit.dtype), self.category[rows],
                                self.score[rows], self.matched[rows], self.ignored[rows], self.truth)

    @classmethod
    def concat(cls, parts: Sequence[DetectionRecords]) -> DetectionRecords:
        """Records of disjoint image sets (Step B's chunks, in any order) as one, images by ascending id."""
        ids = np.concatenate([r.image_ids for r in parts])
        order = np.argsort(ids, kind="stable")
        if np.any(np.diff(ids[order]) == 0):
            raise ValueError("the parts' images overlap: each image's records must come from one part")
        offsets = np.cumsum([0] + [r.image_ids.size for r in parts[:-1]])
        position = np.empty(ids.size, np.int64)
        position[order] = np.arange(ids.size)  # old global image index -> its place by id
        image = position[np.concatenate([r.image.astype(np.int64) + o for r, o in zip(parts, offsets)])]
        rows = np.argsort(image, kind="stable")  # each image's rows keep their (view, exit, category) order
        cat = {c: np.concatenate([getattr(r, c) for r in parts])[rows]
               for c in ("view", "exit", "category", "score", "matched", "ignored")}
        return cls(ids[order], list(parts[0].exits), parts[0].views, image[rows].astype(np.int32),
                   truth=np.concatenate([r.truth for r in parts])[order], **cat)

    def to_arrow(self):
        """Two tables: ``detections`` (one row per detection) and ``truth`` (one row per image)."""
        import pyarrow as pa

        n, k, a = self.truth.shape
        meta = {b"eco_ray.exits": json.dumps(self.exits).encode(), b"eco_ray.views": str(self.views).encode(),
                b"eco_ray.truth_shape": f"{k},{a}".encode()}
        detections = pa.table({"image_id": pa.array(self.image_ids[self.image]), "view": pa.array(self.view),
                               "exit": pa.array(np.asarray(self.exits, np.int8)[self.exit]),
                               "category": pa.array(self.category), "score": pa.array(self.score),
                               "matched": pa.array(self.matched), "ignored": pa.array(self.ignored)})
        truth = pa.table({"image_id": pa.array(self.image_ids), "truth": pa.FixedSizeListArray.from_arrays(
            pa.array(self.truth.reshape(-1).astype(np.int32)), k * a)})
        return detections.replace_schema_metadata(meta), truth.replace_schema_metadata(meta)

    @classmethod
    def from_arrow(cls, detections, truth) -> DetectionRecords:
        meta = detections.schema.metadata or {}
        if b"eco_ray.exits" not in meta:
            raise ValueError("table has no eco_ray.exits metadata: not written by DetectionRecords.to_arrow")
        exits = json.loads(meta[b"eco_ray.exits"])
        k, a = (int(x) for x in meta[b"eco_ray.truth_shape"].decode().split(","))
        ids = truth.column("image_id").to_numpy()
        index = np.searchsorted(ids, detections.column("image_id").to_numpy())
        exit_index = np.zeros(max(exits) + 1, np.int8)
        exit_index[exits] = np.arange(len(exits))
        col = {c: detections.column(c).to_numpy() for c in ("view", "exit", "category", "score", "matched", "ignored")}
        return cls(ids, exits, int(meta[b"eco_ray.views"]), index.astype(np.int32), col["view"],
                   exit_index[col["exit"]], col["category"], col["score"], col["matched"], col["ignored"],
                   truth.column("truth").combine_chunks().flatten().to_numpy().reshape(len(ids), k, a))


def _pack(flags: np.ndarray) -> np.ndarray:
    """(A, T, D) bools -> (D,) uint64, bit a * T + t."""
    a, t, d = flags.shape
    if a * t > 64:
        raise ValueError(f"{a} x {t} flags do not fit in 64 bits")
    weights = np.left_shift(np.uint64(1), np.arange(a * t, dtype=np.uint64))
    return (flags.reshape(a * t, d).astype(np.uint64) * weights[:, None]).sum(0, dtype=np.uint64)


def _unpack(bits: np.ndarray, areas: int, thresholds: int) -> np.ndarray:
    shifts = np.arange(areas * thresholds, dtype=np.uint64)
    return ((bits[None, :] >> shifts[:, None]) & np.uint64(1)).astype(bool).reshape(areas, thresholds, -1)
