"""Batching into what transformers' Mask2Former consumes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from eco_ray.data.coco_panoptic import PanopticSample
from eco_ray.metrics.panoptic import CategorySet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pixel_values(images: Sequence[np.ndarray], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(H, W, 3) uint8 images of one size -> normalised float (B, 3, H, W)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def collate_panoptic(samples: Sequence[PanopticSample], categories: CategorySet) -> dict:
    """Batch of equally sized samples -> ``pixel_values`` (B,3,H,W), ``mask_labels`` (list of (S,H,W) float),
    ``class_labels`` (list of (S,) long, contiguous category indices) and, for evaluation, ``targets``
    (the id maps and segments_info). Crowd segments are left out of the training labels: their pixels
    are neither a target nor background to learn, as in Mask2Former's COCO panoptic mapper."""
    shapes = {s.image.shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"samples in a batch must share one size, got {sorted(shapes)}; resize/crop first")
    mask_labels, class_labels = [], []
    for s in samples:
        keep = [seg for seg in s.segments if not seg.get("iscrowd", 0)]
        masks = np.stack([s.id_map == seg["id"] for seg in keep]) if keep else np.zeros((0, *s.id_map.shape), bool)
        mask_labels.append(torch.from_numpy(masks).float())
        class_labels.append(torch.tensor([categories.index(seg["category_id"]) for seg in keep], dtype=torch.long))
    return {
        "pixel_values": pixel_values([s.image for s in samples]),
        "mask_labels": mask_labels,
        "class_labels": class_labels,
        "image_ids": [s.image_id for s in samples],
        "targets": [{"id_map": s.id_map, "segments": s.segments} for s in samples],
    }
