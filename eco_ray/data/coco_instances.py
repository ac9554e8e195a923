"""COCO *instance* annotations (detection): made from panoptic ones, and read in the COCO 2017 layout.

Layout: ``ROOT/<split>/`` images and ``ROOT/annotations/instances_<split>.json`` (COCO's own files are
``instances_val2017.json`` beside ``val2017/``). Each annotation has ``id``, ``image_id``, ``category_id``,
``bbox`` [x, y, w, h] in pixels, ``area``, ``iscrowd`` and a ``segmentation`` (polygons or RLE; the detector
reads only the box). A panoptic dataset's things become instances with ``instances_from_panoptic``: one per
thing segment, its mask as compressed RLE (pycocotools), its box the mask's, its category and iscrowd the
segment's; stuff is left out, as in COCO's instance files. The generator writes both files for the same scenes.

Every problem with the data on disk is a :class:`DatasetError` that names the file and the entry.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eco_ray.data.coco_panoptic import (
    CocoPanopticDataset,
    DatasetError,
    _file_name,
    _require,
    coco_document,
    integer_field,
    load_every,
    load_json,
    read_image,
)


def instances_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def instance_annotations(id_map: np.ndarray, segments: list[dict], image_id: int, thing_ids: set[int]) -> list[dict]:
    """The instance annotations (without ``id``) of one image's thing segments: RLE mask, box, area."""
    from pycocotools import mask as mask_utils

    out = []
    for seg in segments:
        if int(seg["category_id"]) not in thing_ids:
            continue
        binary = np.asfortranarray((id_map == int(seg["id"])).astype(np.uint8))
        rle = mask_utils.encode(binary)
        area = float(mask_utils.area(rle))
        if area == 0:
            continue
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": int(image_id), "category_id": int(seg["category_id"]),
                    "segmentation": rle, "area": area,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": int(seg.get("iscrowd", 0))})
    return out


def _is_thing(category: dict) -> bool:
    return int(category.get("isthing", 1)) == 1  # a category list without isthing is all things (instances)


def instances_document(images: list[dict], per_image: list[list[dict]], categories: list[dict], info=None) -> dict:
    """A COCO instances document; annotation ids 1, 2, ... in image order; thing categories only."""
    anns, next_id = [], 1
    for group in per_image:
        for ann in group:
            anns.append({"id": next_id, **ann})
            next_id += 1
    things = [{k: c[k] for k in ("id", "name", "supercategory") if k in c} for c in categories if _is_thing(c)]
    return {"info": dict(info or {}), "licenses": [], "images": images, "annotations": anns, "categories": things}


def instances_from_panoptic(dataset: CocoPanopticDataset, progress=None) -> dict:
    """The COCO instances document of a panoptic dataset's things (reads every id PNG, not the images)."""
    categories = dataset.category_entries
    thing_ids = {int(c["id"]) for c in categories if _is_thing(c)}
    images, per_image = [], []
    for i in range(len(dataset)):
        id_map, segments = dataset.ground_truth(i)
        meta = dataset.image_meta(i)
        images.append({k: v for k, v in meta.items()
                       if k in ("id", "file_name", "width", "height") or k.startswith("eco_")})
        per_image.append(instance_annotations(id_map, segments, int(meta["id"]), thing_ids))
        if progress and (i + 1) % 500 == 0:
            progress(i + 1, len(dataset))
    info = {**dataset.info, "converted_from": str(dataset.paths.annotations_json)}
    return instances_document(images, per_image, categories, info)


def write_instances_from_panoptic(root: str | Path, split: str, out: str | Path | None = None, progress=None
                                  ) -> tuple[Path, dict]:
    """Write ``annotations/instances_<split>.json`` (or ``out``) for a panoptic split; -> (path, counts)."""
    doc = instances_from_panoptic(CocoPanopticDataset.from_root(root, split), progress)
    path = Path(out) if out else instances_path(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)  # a reader never sees half a file
    return path, {"images": len(doc["images"]), "instances": len(doc["annotations"]),
                  "crowd": sum(a["iscrowd"] for a in doc["annotations"]), "categories": len(doc["categories"])}


@dataclass
class DetectionSample:
    image_id: int
    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (N, 4) float [x, y, w, h] in pixels
    category_ids: np.ndarray  # (N,) int
    iscrowd: np.ndarray  # (N,) int
    meta: dict


class CocoInstancesDataset:
    """Indexable dataset of :class:`DetectionSample`; the JSON is checked up front, images load lazily.
    ``labels`` are indices into the categories sorted by id (the detector's classes)."""

    def __init__(self, annotations_json: str | Path, images_dir: str | Path):
        self.annotations_json, self.images_dir = Path(annotations_json), Path(images_dir)
        path = self.annotations_json
        data = coco_document(path, load_json(path, "instances file"), "COCO instances file")
        if not self.images_dir.is_dir():
            raise DatasetError(f"directory not found: {self.images_dir}")
        categories = {}
        for i, c in enumerate(data["categories"]):
            _require(c, ("id", "name"), f"{path}: category #{i}")
            cid = integer_field(c["id"], f"{path}: category #{i} id")
            if cid in categories:
                raise DatasetError(f"{path}: category id {cid} appears twice")
            categories[cid] = c
        if not categories:
            raise DatasetError(f"{path}: no categories")
        self.category_ids = sorted(categories)
        self.categories = [categories[c] for c in self.category_ids]
        images = {}
        for i, im in enumerate(data["images"]):
            where = f"{path}: image #{i}"
            _require(im, ("id", "file_name", "width", "height"), where)
            image_id = integer_field(im["id"], f"{where} id")
            if image_id in images:
                raise DatasetError(f"{where}: image id {image_id} appears twice")
            _file_name(im["file_name"], where)
            for key in ("width", "height"):
                if integer_field(im[key], f"{where} {key}") <= 0:
                    raise DatasetError(f"{where}: {key} must be > 0, got {im[key]}")
            images[image_id] = im
        per_image: dict[int, list[dict]] = {i: [] for i in images}
        seen: set[int] = set()
        for i, ann in enumerate(data["annotations"]):
            where = f"{path}: annotation #{i}"
            _require(ann, ("id", "image_id", "category_id", "bbox"), where)
            ann_id = integer_field(ann["id"], f"{where} id")
            if ann_id in seen:
                raise DatasetError(f"{where}: annotation id {ann_id} appears twice")
            seen.add(ann_id)
            image_id = integer_field(ann["image_id"], f"{where} image_id")
            if image_id not in images:
                raise DatasetError(f"{where}: unknown image id {image_id}")
            if integer_field(ann["category_id"], f"{where} category_id") not in categories:
                raise DatasetError(f"{where}: unknown category {ann['category_id']}")
            box = ann["bbox"]
            if not (isinstance(box, list) and len(box) == 4 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
                raise DatasetError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {box!r}")
            if box[2] < 0 or box[3] < 0:
                raise DatasetError(f"{where}: bbox {box} has a negative width or height")
            if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd", 0), bool):
                raise DatasetError(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
            per_image[image_id].append(ann)
        self.image_ids = sorted(images)
        self._images = images
        self._anns = per_image
        self.document = data  # what COCOeval reads as the ground truth

    @classmethod
    def from_root(cls, root: str | Path, split: str) -> CocoInstancesDataset:
        return cls(instances_path(root, split), Path(root) / split)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_meta(self, index: int) -> dict:
        return self._images[self.image_ids[index]]

    def annotations(self, index: int) -> list[dict]:
        return self._anns[self.image_ids[index]]

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index``."""
        return self.images_dir / self.image_meta(index)["file_name"]

    def __getitem__(self, index: int) -> DetectionSample:
        meta = self.image_meta(index)
        image = read_image(self.images_dir / meta["file_name"], "RGB")
        if image.shape[:2] != (meta["height"], meta["width"]):
            raise DatasetError(f"{self.images_dir / meta['file_name']}: the image is {image.shape[1]}x{image.shape[0]} "
                               f"but {self.annotations_json} says {meta['width']}x{meta['height']}")
        anns = self.annotations(index)
        boxes = np.asarray([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        return DetectionSample(int(meta["id"]), image, boxes, np.asarray([a["category_id"] for a in anns], np.int64),
                               np.asarray([a.get("iscrowd", 0) for a in anns], np.int64), dict(meta))

    def labels(self, category_ids: np.ndarray) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.category_ids)}
        return np.asarray([index[int(c)] for c in category_ids], np.int64)

    def validate(self) -> list[str]:
        """Load every sample; return one message per broken one (empty list: all good)."""
        return load_every(self)
