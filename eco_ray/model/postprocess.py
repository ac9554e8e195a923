"""Model output -> COCO-style panoptic prediction (id map + segments), via transformers' own logic."""

from __future__ import annotations

import logging

import numpy as np
from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

from eco_ray.metrics.panoptic import CategorySet
from eco_ray.model.early_exit import ExitOutput

_PROCESSOR = None


def _processor() -> Mask2FormerImageProcessorPil:
    global _PROCESSOR
    if _PROCESSOR is None:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        _PROCESSOR = Mask2FormerImageProcessorPil()
    return _PROCESSOR


def to_panoptic(output: ExitOutput, categories: CategorySet, size: tuple[int, int], threshold: float = 0.5,
                mask_threshold: float = 0.5, overlap_threshold: float = 0.8) -> list[tuple[np.ndarray, list[dict]]]:
    """Per image: an (H, W) int64 id map (0 = void) and segments ``{id, category_id, score}``.

    Stuff categories are fused into one segment per category, as the panoptic format expects."""
    stuff = {i for i, thing in enumerate(categories.isthing) if not thing}
    results = _processor().post_process_panoptic_segmentation(
        output, threshold=threshold, mask_threshold=mask_threshold, overlap_mask_area_threshold=overlap_threshold,
        label_ids_to_fuse=stuff, target_sizes=[tuple(size)] * output.class_queries_logits.shape[0])
    out = []
    for r in results:
        id_map = r["segmentation"].cpu().numpy().astype(np.int64)
        id_map[id_map < 0] = 0  # the library marks "no segment at all" with -1
        present = set(np.unique(id_map).tolist())
        segments = [{"id": int(s["id"]), "category_id": int(categories.ids[s["label_id"]]), "score": float(s["score"])}
                    for s in r["segments_info"] if s["id"] in present]
        out.append((id_map, segments))
    return out
