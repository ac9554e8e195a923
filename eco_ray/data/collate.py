"""Batching into what transformers' Mask2Former and Deformable DETR consume."""

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


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, 3) uint8 image resized to size x size (bilinear), whatever its aspect ratio."""
    from PIL import Image

    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def collate_detection(samples, labels_of, size: int, flip: Sequence[bool] | None = None) -> dict:
    """Detection samples -> ``pixel_values`` (B, 3, size, size), each image resized to the square input
    whatever its shape, and ``labels``: per image ``{"class_labels", "boxes"}`` with the non-crowd boxes as
    (cx, cy, w, h) relative to the image (what the resize leaves unchanged, and what DETR's loss reads).
    ``flip[i]`` mirrors image i and its boxes. ``labels_of`` maps category ids to class indices. Relative
    boxes are also how predictions map back to an image's own pixels (``to_detections``), so evaluation
    scores every image at its own size against its own ground truth."""
    flip = list(flip) if flip is not None else [False] * len(samples)
    images, labels = [], []
    for s, mirrored in zip(samples, flip):
        h, w = s.image.shape[:2]
        keep = s.iscrowd == 0
        b = s.boxes[keep].astype(np.float64)
        cx, cy = (b[:, 0] + b[:, 2] / 2) / w, (b[:, 1] + b[:, 3] / 2) / h
        image = resize_image(s.image, size)
        if mirrored:
            image, cx = image[:, ::-1].copy(), 1.0 - cx
        boxes = np.stack([cx, cy, b[:, 2] / w, b[:, 3] / h], 1) if len(b) else np.zeros((0, 4))
        images.append(image)
        labels.append({"class_labels": torch.from_numpy(labels_of(s.category_ids[keep])),
                       "boxes": torch.from_numpy(np.clip(boxes, 0.0, 1.0).astype(np.float32))})
    return {"pixel_values": pixel_values(images), "labels": labels, "image_ids": [s.image_id for s in samples],
            "sizes": [s.image.shape[:2] for s in samples]}
