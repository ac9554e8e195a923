"""Score a parent at every exit on a dataset (Ray-free): per-image, per-exit panoptic statistics for the
segmenter, per-image, per-exit detections and COCOeval matching records for the detector.

Used by training (periodic validation) and by Step B (the derived table). One multi-exit pass per
batch; panoptic statistics are additive, and detection matching records assemble into the AP of any set of
images at any exits (eco_ray/metrics/detection.py), so any aggregate (per exit, per kind, per gate decision)
follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from contextlib import nullcontext

import numpy as np
import torch

from eco_ray.data.coco_panoptic import CocoPanopticDataset
from eco_ray.data.collate import pixel_values
from eco_ray.data.transforms import HorizontalFlip, build_transform
from eco_ray.metrics.panoptic import PanopticStats, image_stats
from eco_ray.model.early_exit import EarlyExitMask2Former
from eco_ray.model.postprocess import OVERLAP_THRESHOLD, to_panoptic


@dataclass
class ExitEvaluation:
    image_ids: np.ndarray  # (N,)
    exits: list[int]
    stats: PanopticStats  # (N, E, C)
    gate_features: np.ndarray  # (N, d) float32
    meta: list[dict]  # the dataset's image entries (eco_kind etc. for the synthetic data)


@torch.no_grad()
def evaluate_exits(model: EarlyExitMask2Former, dataset: CocoPanopticDataset, exits: Sequence[int] | None = None,
                   indices: Sequence[int] | None = None, batch_size: int = 16, flip: bool = False,
                   threshold: float = 0.5, mask_threshold: float = 0.5, overlap_threshold: float = OVERLAP_THRESHOLD,
                   progress: Callable[[int, int], None] | None = None, autocast: bool = False) -> ExitEvaluation:
    """Statistics of ``indices`` (default: all) at each exit. ``flip`` scores the horizontally mirrored
    images instead (used to measure label noise and to average it away). The model runs where its weights are
    (``autocast``: bf16 on a GPU); post-processing runs there too, the statistics on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    exits = list(model.exits if exits is None else exits)
    indices = list(range(len(dataset)) if indices is None else indices)
    size = model.config.image_size
    transform = build_transform(size, train=False)
    rng = np.random.default_rng(0)
    all_stats, feats, ids, metas = [], [], [], []
    for start in range(0, len(indices), batch_size):
        samples = [transform(dataset[i], rng) for i in indices[start:start + batch_size]]
        if flip:
            samples = [HorizontalFlip(p=1.0)(s, rng) for s in samples]
        with ctx:
            out = model.forward_exits(pixel_values([s.image for s in samples]).to(device), exits)
        per_exit = [to_panoptic(out[k], dataset.categories, (size, size), threshold, mask_threshold,
                                 overlap_threshold) for k in exits]
        for j, s in enumerate(samples):
            all_stats.append(PanopticStats.stack([
                image_stats(s.id_map, s.segments, *per_exit[e][j], dataset.categories) for e in range(len(exits))]))
            ids.append(s.image_id)
            metas.append(s.meta)
        feats.append(out[exits[0]].gate_features.float().cpu().numpy())
        if progress:
            progress(min(start + batch_size, len(indices)), len(indices))
    return ExitEvaluation(np.asarray(ids), exits, PanopticStats.stack(all_stats),
                          np.concatenate(feats) if feats else np.zeros((0, model.config.hidden_dim), np.float32), metas)


def write_predictions(engine, dataset: CocoPanopticDataset, out_json, control=None, batch_size: int = 8,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Predict every image of ``dataset`` with a serving :class:`~eco_ray.serve.engine.Engine` (the gate's
    decision and the forward pass a request gets, at each image's own size) and write the predictions in the
    COCO panoptic format: ``out_json`` and, beside it, a folder of id PNGs of the same name. Each annotation
    also records the exit the image got, its encoder GFLOPs and whether its target was met (``eco_exit``,
    ``eco_encoder_gflops``, ``eco_target_met``: None without a target)."""
    from pathlib import Path

    from PIL import Image

    from eco_ray import files
    from eco_ray.data.coco_panoptic import id2rgb
    from eco_ray.data.predictions import default_png_folder
    from eco_ray.serve.engine import RequestControl, resize_ids

    out_json = Path(out_json)
    folder = default_png_folder(out_json)
    folder.mkdir(parents=True, exist_ok=True)
    control = control or RequestControl()
    gflops_of = dict(zip(engine.exits, engine.gflops))
    annotations = []
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        images = [dataset.image(i) for i in indices]  # the ground truth is read once, when scored
        for i, image, ((id_map, segments), k, met) in zip(indices, images,
                                                           engine.predict(images, [control] * len(images))):
            image_id = dataset.image_ids[i]
            name = f"{image_id}.png"
            id_map = resize_ids(id_map, image.shape[:2])
            Image.fromarray(id2rgb(id_map)).save(folder / name)
            present = set(np.unique(id_map).tolist())
            annotations.append({"image_id": image_id, "file_name": name, "eco_exit": k,
                                "eco_encoder_gflops": gflops_of[k], "eco_target_met": met,
                                "segments_info": [{"id": int(s["id"]), "category_id": int(s["category_id"]),
                                                   "score": round(float(s["score"]), 4)}
                                                  for s in segments if s["id"] in present]})
        if progress:
            progress(min(start + batch_size, len(dataset)), len(dataset))
    doc = {"info": {"versions": engine.versions}, "annotations": annotations,
           "categories": engine.categories.to_coco()}
    files.write_json(out_json, doc, indent=None)
    return doc


@dataclass
class DetectionEvaluation:
    image_ids: np.ndarray  # (N,)
    exits: list[int]
    detections: dict[int, list[dict]]  # exit -> COCO results (image_id, category_id, bbox, score)
    records: dict[int, dict]  # exit -> image id -> ImageMatches (COCOeval's per-image matching)
    gate_features: np.ndarray  # (N, d) float32
    meta: list[dict]


@torch.no_grad()
def evaluate_detector_exits(model, dataset, exits: Sequence[int] | None = None, indices: Sequence[int] | None = None,
                            batch_size: int = 16, flip: bool = False,
                            progress: Callable[[int, int], None] | None = None,
                            autocast: bool = False) -> DetectionEvaluation:
    """Detections of ``indices`` (default: all) of a COCO instances dataset at each exit, in each image's own
    pixels, and their COCOeval matching records. ``flip`` predicts on the mirrored images and mirrors the boxes
    back, so both views are scored against the same ground truth."""
    from eco_ray.data.collate import collate_detection
    from eco_ray.metrics.detection import match_images
    from eco_ray.model.postprocess import to_detections

    model.eval()
    device = next(model.parameters()).device
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    exits = list(model.exits if exits is None else exits)
    indices = list(range(len(dataset)) if indices is None else indices)
    detections: dict[int, list[dict]] = {k: [] for k in exits}
    feats, ids, metas = [], [], []
    for start in range(0, len(indices), batch_size):
        samples = [dataset[i] for i in indices[start:start + batch_size]]
        batch = collate_detection(samples, dataset.labels, model.config.image_size, flip=[flip] * len(samples))
        with ctx:
            out = model.forward_exits(batch["pixel_values"].to(device), exits)
        for k in exits:
            for s, dets, (h, w) in zip(samples, to_detections(out[k], dataset.category_ids, batch["sizes"]),
                                       batch["sizes"]):
                for d in dets:
                    if flip:
                        x, y, bw, bh = d["bbox"]
                        d["bbox"] = [w - x - bw, y, bw, bh]
                    detections[k].append({"image_id": s.image_id, **d})
        ids += [s.image_id for s in samples]
        metas += [s.meta for s in samples]
        feats.append(out[exits[0]].gate_features.float().cpu().numpy())
        if progress:
            progress(min(start + batch_size, len(indices)), len(indices))
    records = {k: match_images(dataset.document, detections[k], image_ids=ids) for k in exits}
    gate_dim = model.config.gate_dim
    return DetectionEvaluation(np.asarray(ids), exits, detections, records,
                               np.concatenate(feats) if feats else np.zeros((0, gate_dim), np.float32), metas)
