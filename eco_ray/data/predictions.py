"""Panoptic predictions in the COCO format, scored against a dataset's ground truth.

Predictions are what panopticapi's ``pq_compute`` reads: a JSON whose ``annotations`` hold, per image,
``image_id``, ``file_name`` (an id PNG, id = R + 256 G + 256^2 B) and ``segments_info`` (``id``,
``category_id``), and the folder of those PNGs (by default the JSON's name without ``.json``, as COCO lays out
``panoptic_val2017.json`` beside ``panoptic_val2017/``). Scores are the additive statistics of
``eco_ray.metrics`` (the ones Step B stores), aggregated to PQ / SQ / RQ exactly as ``pq_compute`` does, and
mIoU of the semantic maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eco_ray.data.coco_panoptic import (
    CocoPanopticDataset,
    DatasetError,
    check_segments,
    check_segments_info,
    coco_document,
    integer_field,
    load_json,
    read_image,
    rgb2id,
)
from eco_ray.metrics.panoptic import (
    CategorySet,
    PanopticInputError,
    PanopticResult,
    PanopticStats,
    aggregate,
    image_stats,
)


@dataclass
class PredictionScore:
    """Per-image statistics of a prediction set, shape (N, C), and what they aggregate to."""

    image_ids: np.ndarray
    stats: PanopticStats
    categories: CategorySet

    def result(self) -> PanopticResult:
        return aggregate(self.stats, self.categories)

    def per_class(self) -> list[dict]:
        s = self.stats.sum()
        r = self.result()
        rows = []
        for i, c in enumerate(self.categories.categories):
            tp, fp, fn = int(s.tp[i]), int(s.fp[i]), int(s.fn[i])
            denom = tp + 0.5 * fp + 0.5 * fn
            rows.append({"id": c.id, "name": c.name, "isthing": c.isthing, "tp": tp, "fp": fp, "fn": fn,
                         # None: the category has no segment in either (pq_compute reports 0 there)
                         "pq": float(s.iou_sum[i] / denom) if denom else None,
                         "sq": (float(s.iou_sum[i] / tp) if tp else 0.0) if denom else None,
                         "rq": float(tp / denom) if denom else None,
                         "iou": None if np.isnan(r.per_class_iou[i]) else float(r.per_class_iou[i])})
        return rows

    def to_json(self) -> dict:
        return {"images": int(len(self.image_ids)), **self.result().summary(), "per_class": self.per_class()}


def default_png_folder(pred_json: str | Path) -> Path:
    pred_json = Path(pred_json)
    return pred_json.with_suffix("") if pred_json.suffix == ".json" else pred_json.parent / (pred_json.name + "_pngs")


def read_prediction_index(pred_json: str | Path, categories: CategorySet) -> dict[int, dict]:
    """image id -> the prediction's annotation entry, every field checked (a DatasetError naming the entry)."""
    pred_json = Path(pred_json)
    data = coco_document(pred_json, load_json(pred_json, "prediction file"), "COCO panoptic prediction file",
                         ("annotations",))
    index: dict[int, dict] = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{pred_json}: annotation #{i}"
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "file_name", "segments_info")):
            raise DatasetError(f"{where}: needs image_id, file_name and segments_info")
        image_id = integer_field(ann["image_id"], f"{where} image_id")
        if image_id in index:
            raise DatasetError(f"{where}: a second prediction for image {image_id}")
        if not isinstance(ann["file_name"], str) or not ann["file_name"]:
            raise DatasetError(f"{where}: file_name must be a non-empty string, got {ann['file_name']!r}")
        check_segments_info(ann["segments_info"], categories, f"{where} ({ann['file_name']})", crowd=False)
        index[image_id] = ann
    return index


def score_predictions(gt: CocoPanopticDataset, pred_json: str | Path, pred_pngs: str | Path | None = None,
                      progress: Callable[[int, int], None] | None = None) -> PredictionScore:
    """Score every image of ``gt``: each needs a prediction (as ``pq_compute`` requires); predictions of images
    outside ``gt`` are an error too, so that a wrong split is not scored as a partial one."""
    index = read_prediction_index(pred_json, gt.categories)
    pred_pngs = Path(pred_pngs) if pred_pngs is not None else default_png_folder(pred_json)
    if not pred_pngs.is_dir():
        raise DatasetError(f"prediction PNG folder not found: {pred_pngs} (give it with --pred-pngs)")
    unknown = sorted(set(index) - set(gt.image_ids))
    if unknown:
        raise DatasetError(f"{pred_json}: predictions for {len(unknown)} image ids that are not in the ground "
                           f"truth (e.g. {unknown[:5]}): is it the right split?")
    missing = [i for i in gt.image_ids if i not in index]
    if missing:
        raise DatasetError(f"{pred_json}: no prediction for {len(missing)} of {len(gt)} images (e.g. image ids "
                           f"{missing[:5]})")
    stats = []
    for n, image_id in enumerate(gt.image_ids):
        gt_ids, gt_segments = gt.ground_truth(n)
        ann = index[image_id]
        png = pred_pngs / ann["file_name"]
        pred_ids = rgb2id(read_image(png, "RGB")).astype(np.int64)
        if pred_ids.shape != gt_ids.shape:
            raise DatasetError(f"{png}: {pred_ids.shape[1]}x{pred_ids.shape[0]}, the ground truth of image "
                               f"{image_id} is {gt_ids.shape[1]}x{gt_ids.shape[0]}")
        segments = [dict(s) for s in ann["segments_info"]]
        check_segments(png, pred_ids, segments)
        try:
            stats.append(image_stats(gt_ids, gt_segments, pred_ids, segments, gt.categories))
        except PanopticInputError as e:
            raise DatasetError(f"{png} (image {image_id}): {e}") from None
        if progress:
            progress(n + 1, len(gt))
    return PredictionScore(np.asarray(gt.image_ids), PanopticStats.stack(stats) if stats
                           else PanopticStats.zeros((0, len(gt.categories))), gt.categories)
