"""Model output -> COCO-style predictions: panoptic (id map + segments), as the original Mask2Former does it,
and detections in COCO's result format, as transformers' Deformable DETR does it.

Why not transformers' ``post_process_panoptic_segmentation``: in transformers 5.x it multiplies the mask
probabilities by the query scores in place and only then thresholds them for a segment's "original area",
so a query with class score s keeps a segment only where its mask probability is >= 0.5 / s. A query
scoring 0.5 then needs a mask probability of 1.0 and its segment disappears: that silently removed most
segments of a model whose class scores are still moderate. It also resizes every mask to 384 x 384 first.
Here (the detectron2 Mask2Former ``panoptic_inference``): queries with a non-void label and a score above
``threshold`` are kept; each pixel goes to the query maximising score x mask probability; a query becomes
a segment if its won pixels with mask probability >= ``mask_threshold`` are non-empty and at least
``overlap_threshold`` of its own thresholded mask; stuff classes are fused into one segment per class.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from eco_ray.metrics.panoptic import CategorySet
from eco_ray.model.config import OVERLAP_THRESHOLD
from eco_ray.model.early_exit import ExitOutput


@torch.no_grad()
def to_panoptic(output: ExitOutput, categories: CategorySet, size: tuple[int, int], threshold: float = 0.5,
                mask_threshold: float = 0.5, overlap_threshold: float = OVERLAP_THRESHOLD
                ) -> list[tuple[np.ndarray, list[dict]]]:
    """Per image: an (H, W) int64 id map (0 = void) and segments ``{id, category_id, score}``."""
    logits = output.class_queries_logits.float()
    masks = F.interpolate(output.masks_queries_logits.float(), size=tuple(size), mode="bilinear",
                          align_corners=False).sigmoid()
    scores, labels = logits.softmax(-1).max(-1)
    num_labels = logits.shape[-1] - 1
    isthing = np.asarray(categories.isthing, dtype=bool)
    category_ids = np.asarray(categories.ids)
    out = []
    for i in range(logits.shape[0]):
        keep = (labels[i] != num_labels) & (scores[i] > threshold)
        id_map = np.zeros(tuple(size), np.int64)
        segments: list[dict] = []
        if keep.any():
            cur_scores, cur_labels, cur_masks = scores[i][keep], labels[i][keep], masks[i][keep]
            owner = (cur_scores[:, None, None] * cur_masks).argmax(0)
            above = cur_masks >= mask_threshold
            ids = torch.zeros(tuple(size), dtype=torch.long, device=masks.device)
            stuff_segment: dict[int, int] = {}
            next_id = 0
            for k in range(cur_labels.shape[0]):
                won = owner == k
                mask = won & above[k]
                won_area, original_area, area = int(won.sum()), int(above[k].sum()), int(mask.sum())
                if won_area == 0 or original_area == 0 or area == 0 or won_area / original_area < overlap_threshold:
                    continue
                label = int(cur_labels[k])
                if not bool(isthing[label]) and label in stuff_segment:
                    ids[mask] = stuff_segment[label]
                    continue
                next_id += 1
                ids[mask] = next_id
                if not bool(isthing[label]):
                    stuff_segment[label] = next_id
                segments.append({"id": next_id, "category_id": int(category_ids[label]),
                                 "score": float(cur_scores[k])})
            id_map = ids.cpu().numpy().astype(np.int64)
            present = set(np.unique(id_map).tolist())
            segments = [s for s in segments if s["id"] in present]
        out.append((id_map, segments))
    return out


# a DETR's post-processing keeps the 100 best (query, class) pairs per image, as COCO's maxDets[-1]
DETECTIONS_PER_IMAGE = 100


@torch.no_grad()
def to_detections(output, category_ids, sizes, top_k: int = DETECTIONS_PER_IMAGE) -> list[list[dict]]:
    """Per image, detections in COCO's result format (``category_id``, ``bbox`` [x, y, w, h] in pixels of
    ``sizes[i]`` = (height, width), ``score``), best first: transformers' Deformable DETR post-processing
    (sigmoid scores, the ``top_k`` best (query, class) pairs), with no score threshold, as COCO AP wants."""
    # in float32: bf16 scores (autocast) keep ~3 digits, and the ties they make would reorder COCO's ranking
    full = SimpleNamespace(logits=output.logits.float(), pred_boxes=output.pred_boxes.float())
    kept = _detr_processor().post_process_object_detection(full, threshold=-1.0,
                                                           target_sizes=[tuple(s) for s in sizes], top_k=top_k)
    ids = np.asarray(category_ids)
    out = []
    for det in kept:
        boxes = det["boxes"].float().cpu().numpy()
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        out.append([{"category_id": int(ids[int(c)]), "bbox": [float(v) for v in b], "score": float(s)}
                    for c, b, s in zip(det["labels"].tolist(), xywh, det["scores"].tolist())])
    return out


@functools.cache
def _detr_processor():
    # the PIL processor: the default one needs torchvision, which post-processing does not
    from transformers.models.deformable_detr.image_processing_pil_deformable_detr import (
        DeformableDetrImageProcessorPil,
    )

    return DeformableDetrImageProcessorPil()
