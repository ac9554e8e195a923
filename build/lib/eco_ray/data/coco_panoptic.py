"""Reader for any dataset in the COCO panoptic format.

Layout (COCO 2017): ``ROOT/<split>/`` images, ``ROOT/annotations/panoptic_<split>.json`` and
``ROOT/annotations/panoptic_<split>/`` RGB-encoded id PNGs (id = R + 256 G + 256^2 B). Explicit paths
can be given instead for datasets laid out differently.

Every problem with the data on disk is a :class:`DatasetError` that names the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from eco_ray.errors import EcoRayError
from eco_ray.metrics.panoptic import VOID, CategorySet


class DatasetError(EcoRayError):
    """The dataset on disk is missing, malformed or inconsistent; the message names the file."""


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.uint32)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)


@dataclass(frozen=True)
class SplitPaths:
    images: Path
    annotations_json: Path
    panoptic_pngs: Path

    @classmethod
    def coco_layout(cls, root: str | Path, split: str) -> SplitPaths:
        root = Path(root)
        return cls(root / split, root / "annotations" / f"panoptic_{split}.json", root / "annotations" / f"panoptic_{split}")


@dataclass
class PanopticSample:
    """One image with its ground truth. ``masks``/``category_ids``/``iscrowd`` are per segment."""

    image_id: int
    image: np.ndarray  # (H, W, 3) uint8
    id_map: np.ndarray  # (H, W) int64 segment ids, 0 = void
    segments: list[dict]  # segments_info entries: id, category_id, iscrowd (+ area, bbox)
    meta: dict  # the image entry of the JSON (file_name, width, height, any extra fields)

    @property
    def masks(self) -> np.ndarray:
        return np.stack([self.id_map == s["id"] for s in self.segments]) if self.segments else \
            np.zeros((0, *self.id_map.shape), bool)


class CocoPanopticDataset:
    """Indexable dataset of :class:`PanopticSample`. Loading is lazy; the JSON is checked up front."""

    def __init__(self, paths: SplitPaths):
        self.paths = paths
        if not paths.annotations_json.is_file():
            raise DatasetError(f"annotation file not found: {paths.annotations_json}")
        for d in (paths.images, paths.panoptic_pngs):
            if not d.is_dir():
                raise DatasetError(f"directory not found: {d}")
        try:
            data = json.loads(paths.annotations_json.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{paths.annotations_json}: not valid JSON ({e})") from None
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(f"{paths.annotations_json}: missing top-level key {key!r}")
        try:
            self.categories = CategorySet(data["categories"])
        except (KeyError, ValueError) as e:
            raise DatasetError(f"{paths.annotations_json}: bad categories ({e})") from None
        images = {int(im["id"]): im for im in data["images"]}
        self._items: list[tuple[dict, dict]] = []
        for ann in data["annotations"]:
            image_id = int(ann["image_id"])
            if image_id not in images:
                raise DatasetError(f"{paths.annotations_json}: annotation for unknown image id {image_id}")
            for seg in ann["segments_info"]:
                if seg["category_id"] not in self.categories:
                    raise DatasetError(f"{paths.annotations_json}: image {image_id} ({ann['file_name']}) has a "
                                       f"segment of unknown category {seg['category_id']}")
            self._items.append((images[image_id], ann))
        self._items.sort(key=lambda item: int(item[0]["id"]))
        self.image_ids = [int(im["id"]) for im, _ in self._items]
        self.info = data.get("info", {})

    @classmethod
    def from_root(cls, root: str | Path, split: str) -> CocoPanopticDataset:
        return cls(SplitPaths.coco_layout(root, split))

    def __len__(self) -> int:
        return len(self._items)

    def image_meta(self, index: int) -> dict:
        return self._items[index][0]

    def __getitem__(self, index: int) -> PanopticSample:
        image_meta, ann = self._items[index]
        image_path = self.paths.images / image_meta["file_name"]
        png_path = self.paths.panoptic_pngs / ann["file_name"]
        image = _read_image(image_path, "RGB")
        id_map = rgb2id(_read_image(png_path, "RGB")).astype(np.int64)
        if image.shape[:2] != id_map.shape:
            raise DatasetError(f"{png_path}: id map is {id_map.shape[1]}x{id_map.shape[0]} but the image "
                               f"{image_path.name} is {image.shape[1]}x{image.shape[0]}")
        segments = [dict(s) for s in ann["segments_info"]]
        seg_ids = {int(s["id"]) for s in segments}
        if len(seg_ids) != len(segments):
            raise DatasetError(f"{png_path}: duplicate segment ids in segments_info")
        present = set(np.unique(id_map).tolist()) - {VOID}
        if present - seg_ids:
            raise DatasetError(f"{png_path}: PNG has segment ids {sorted(present - seg_ids)[:10]} that are "
                               f"not in the JSON's segments_info")
        if seg_ids - present:
            raise DatasetError(f"{png_path}: segments_info lists ids {sorted(seg_ids - present)[:10]} that do "
                               f"not occur in the PNG")
        return PanopticSample(int(image_meta["id"]), image, id_map, segments, dict(image_meta))

    def validate(self) -> list[str]:
        """Load every sample; return one message per broken one (empty list: all good)."""
        problems = []
        for i in range(len(self)):
            try:
                self[i]
            except DatasetError as e:
                problems.append(str(e))
        return problems


def _read_image(path: Path, mode: str) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e})") from None
    if arr.size == 0 or min(arr.shape[:2]) == 0:
        raise DatasetError(f"{path}: empty image")
    return arr


def segments_from_id_map(id_map: np.ndarray, category_of: Mapping[int, int], iscrowd: Mapping[int, int] | None = None
                         ) -> list[dict]:
    """COCO segments_info (id, category_id, iscrowd, area, bbox [x, y, w, h]) for the ids in an id map."""
    out = []
    ids, areas = np.unique(id_map, return_counts=True)
    for seg_id, area in zip(ids.tolist(), areas.tolist()):
        if seg_id == VOID:
            continue
        ys, xs = np.nonzero(id_map == seg_id)
        out.append({"id": int(seg_id), "category_id": int(category_of[seg_id]),
                    "iscrowd": int((iscrowd or {}).get(seg_id, 0)), "area": int(area),
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]})
    return out
