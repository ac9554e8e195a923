"""COCO *instance* annotations (polygons, RLE) plus an optional semantic PNG -> COCO panoptic.

Instances are decoded with pycocotools. Overlaps are resolved by painting larger instances first and
smaller ones on top (a small object in front of a large one is the common case in real photos).
An instance left with fewer than ``min_visible`` of its pixels is dropped. Crowd annotations
(``iscrowd=1``) become crowd segments. Pixels no instance covers take their stuff category from the
semantic PNG (value = category id; 0 and 255 = void), one segment per stuff category.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from eco_ray.data.coco_panoptic import DatasetError, id2rgb, segments_from_id_map
from eco_ray.metrics.panoptic import VOID

SEMANTIC_VOID = (0, 255)


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Polygon list, uncompressed RLE (counts as a list) or compressed RLE -> (H, W) bool mask."""
    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), bool)
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
    else:
        raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def convert_instances_to_panoptic(
    instances_json: str | Path,
    out_json: str | Path,
    out_png_dir: str | Path,
    semantic_dir: str | Path | None = None,
    stuff_categories: Sequence[dict] = (),
    min_visible: float = 0.0,
) -> dict:
    """Write ``out_json`` and one id PNG per image into ``out_png_dir``; return the panoptic JSON."""
    instances_json = Path(instances_json)
    try:
        data = json.loads(instances_json.read_text())
    except FileNotFoundError:
        raise DatasetError(f"instance annotation file not found: {instances_json}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{instances_json}: not valid JSON ({e})") from None
    thing_cats = [{**c, "isthing": 1} for c in data["categories"]]
    stuff_cats = [{**c, "isthing": 0} for c in stuff_categories]
    categories = thing_cats + stuff_cats
    known = {c["id"] for c in categories}
    stuff_ids = {c["id"] for c in stuff_cats}
    out_png_dir = Path(out_png_dir)
    out_png_dir.mkdir(parents=True, exist_ok=True)

    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if ann["category_id"] not in known:
            raise DatasetError(f"{instances_json}: annotation {ann.get('id')} has unknown category {ann['category_id']}")
        by_image.setdefault(int(ann["image_id"]), []).append(ann)

    annotations = []
    for image in data["images"]:
        h, w = int(image["height"]), int(image["width"])
        id_map = np.zeros((h, w), np.int64)
        category_of: dict[int, int] = {}
        crowd: dict[int, int] = {}
        next_id = 1
        decoded = []
        full_area: dict[int, int] = {}
        for ann in by_image.get(int(image["id"]), []):
            try:
                m = decode_segmentation(ann["segmentation"], h, w)
            except Exception as e:  # pycocotools raises bare Exceptions for malformed input
                raise DatasetError(f"{instances_json}: annotation {ann.get('id')} of image {image['file_name']}: "
                                   f"cannot decode segmentation ({e})") from None
            decoded.append((ann, m))
        # non-crowd instances, larger first so that smaller ones stay visible on top
        for ann, m in sorted((d for d in decoded if not d[0].get("iscrowd", 0)), key=lambda d: -int(d[1].sum())):
            if m.any():
                id_map[m] = next_id
                category_of[next_id] = ann["category_id"]
                full_area[next_id] = int(m.sum())
                next_id += 1
        for ann, m in decoded:
            if ann.get("iscrowd", 0):
                free = m & (id_map == VOID)
                if free.any():
                    id_map[free] = next_id
                    category_of[next_id] = ann["category_id"]
                    crowd[next_id] = 1
                    next_id += 1
        if min_visible > 0:
            _drop_hidden(id_map, category_of, full_area, min_visible)
        if semantic_dir is not None:
            sem_path = Path(semantic_dir) / (Path(image["file_name"]).stem + ".png")
            if not sem_path.is_file():
                raise DatasetError(f"semantic PNG not found: {sem_path}")
            sem = np.asarray(Image.open(sem_path))
            if sem.shape[:2] != (h, w):
                raise DatasetError(f"{sem_path}: {sem.shape[1]}x{sem.shape[0]}, image is {w}x{h}")
            for cat_id in np.unique(sem).tolist():
                if cat_id in SEMANTIC_VOID:
                    continue
                if cat_id not in stuff_ids:
                    if cat_id in known:  # thing pixels in the semantic map: instances already cover them
                        continue
                    raise DatasetError(f"{sem_path}: value {cat_id} is not a stuff category id")
                free = (sem == cat_id) & (id_map == VOID)
                if free.any():
                    id_map[free] = next_id
                    category_of[next_id] = cat_id
                    next_id += 1
        png_name = Path(image["file_name"]).stem + ".png"
        Image.fromarray(id2rgb(id_map)).save(out_png_dir / png_name)
        annotations.append({"image_id": image["id"], "file_name": png_name,
                            "segments_info": segments_from_id_map(id_map, category_of, crowd)})

    panoptic = {"info": data.get("info", {}), "licenses": data.get("licenses", []),
                "images": data["images"], "annotations": annotations, "categories": categories}
    Path(out_json).write_text(json.dumps(panoptic))
    return panoptic


def _drop_hidden(id_map: np.ndarray, category_of: dict, full_area: dict, min_visible: float) -> None:
    """Remove instances of which less than ``min_visible`` of the decoded area is still visible."""
    ids, visible = np.unique(id_map, return_counts=True)
    visible_of = dict(zip(ids.tolist(), visible.tolist()))
    for seg_id, full in full_area.items():
        if visible_of.get(seg_id, 0) < min_visible * full:
            id_map[id_map == seg_id] = VOID
            category_of.pop(seg_id, None)
