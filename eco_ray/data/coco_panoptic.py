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
        data = coco_document(paths.annotations_json, load_json(paths.annotations_json, "annotation file"),
                             "COCO panoptic file")
        try:
            self.categories = CategorySet(data["categories"])
            self.category_entries = [dict(c) for c in data["categories"]]  # as the file has them
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{paths.annotations_json}: bad categories ({e})") from None
        images = {}
        for i, im in enumerate(data["images"]):
            where = f"{paths.annotations_json}: image #{i}"
            _require(im, ("id", "file_name"), where)
            image_id = integer_field(im["id"], f"{where} id")
            if image_id in images:
                raise DatasetError(f"{where}: image id {image_id} appears twice")
            _file_name(im["file_name"], where)
            images[image_id] = im
        self._items: list[tuple[dict, dict]] = []
        annotated: set[int] = set()
        for i, ann in enumerate(data["annotations"]):
            where = f"{paths.annotations_json}: annotation #{i}"
            _require(ann, ("image_id", "file_name", "segments_info"), where)
            image_id = integer_field(ann["image_id"], f"{where} image_id")
            if image_id not in images:
                raise DatasetError(f"{paths.annotations_json}: annotation for unknown image id {image_id}")
            if image_id in annotated:
                raise DatasetError(f"{where}: a second annotation for image {image_id}")
            annotated.add(image_id)
            where = f"{where} ({_file_name(ann['file_name'], where)})"
            check_segments_info(ann["segments_info"], self.categories, where, crowd=True)
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

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index``."""
        return self.paths.images / self._items[index][0]["file_name"]

    def __getitem__(self, index: int) -> PanopticSample:
        image_meta, _ = self._items[index]
        image_path = self.paths.images / image_meta["file_name"]
        image = self.image(index)
        id_map, segments = self.ground_truth(index)
        if image.shape[:2] != id_map.shape:
            raise DatasetError(f"{self.paths.panoptic_pngs / self._items[index][1]['file_name']}: id map is "
                               f"{id_map.shape[1]}x{id_map.shape[0]} but the image {image_path.name} is "
                               f"{image.shape[1]}x{image.shape[0]}")
        return PanopticSample(int(image_meta["id"]), image, id_map, segments, dict(image_meta))

    def image(self, index: int) -> np.ndarray:
        """The (H, W, 3) uint8 image alone (its ground truth is not read)."""
        return read_image(self.image_path(index), "RGB")

    def ground_truth(self, index: int) -> tuple[np.ndarray, list[dict]]:
        """The id map and segments of one image, checked against each other (the image itself is not read)."""
        _, ann = self._items[index]
        png_path = self.paths.panoptic_pngs / ann["file_name"]
        id_map = rgb2id(read_image(png_path, "RGB")).astype(np.int64)
        segments = [dict(s) for s in ann["segments_info"]]
        check_segments(png_path, id_map, segments)
        return id_map, segments

    def validate(self) -> list[str]:
        """Load every sample; return one message per broken one (empty list: all good)."""
        return load_every(self)


def load_every(dataset) -> list[str]:
    """Load every sample of a dataset; one message per broken one (empty list: all good)."""
    problems = []
    for i in range(len(dataset)):
        try:
            dataset[i]
        except DatasetError as e:
            problems.append(str(e))
    return problems


def check_segments(png_path: Path, id_map: np.ndarray, segments: list[dict]) -> None:
    """The PNG's ids and the JSON's segments_info must name the same segments, each once."""
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


def check_segments_info(segments, categories: CategorySet, where: str, crowd: bool) -> None:
    """A ``segments_info`` list: objects with an integer ``id`` (> 0, once each) and a known integer
    ``category_id`` (and ``iscrowd`` 0 or 1 where ``crowd``); a DatasetError naming the entry otherwise."""
    if not isinstance(segments, list):
        raise DatasetError(f"{where}: segments_info must be a list")
    for seg in segments:
        _require(seg, ("id", "category_id"), f"{where} segment")
        seg_id = integer_field(seg["id"], f"{where}: segment id")
        if seg_id <= 0:
            raise DatasetError(f"{where}: segment id {seg_id}: ids are > 0 (0 is void)")
        category_id = integer_field(seg["category_id"], f"{where}: segment {seg_id} category_id")
        if category_id not in categories:
            raise DatasetError(f"{where}: segment {seg_id} has unknown category {category_id}")
        if crowd and (isinstance(seg.get("iscrowd", 0), str) or seg.get("iscrowd", 0) not in (0, 1)):
            raise DatasetError(f"{where}: segment {seg_id} has iscrowd {seg['iscrowd']!r}; it must be 0 or 1")


def coco_document(path: Path, data, what: str, keys: tuple[str, ...] = ("images", "annotations", "categories")
                  ) -> dict:
    """``data`` if it is a JSON object holding the lists ``keys``; a DatasetError naming the file otherwise."""
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a {what} is a JSON object with the lists {', '.join(keys)}; this one is a "
                           f"{type(data).__name__}")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: {'missing' if key not in data else 'not a list:'} top-level key {key!r} "
                               f"(a {what} has the lists {', '.join(keys)})")
    return data


def load_json(path: str | Path, what: str = "file"):
    """A JSON file's content, or a DatasetError naming the file (missing, a directory, unreadable, not JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory; give the {what} itself") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def _require(entry, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: must be an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DatasetError(f"{where}: missing {', '.join(map(repr, missing))}")


def integer_field(value, where: str) -> int:
    """An id as the JSON must hold it: an integer (not a bool, not ``1.5``, not ``"1"``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{where} must be an integer, got {value!r}")
    return value


def _file_name(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: file_name must be a non-empty string, got {value!r}")
    return value


def read_image(path: Path, mode: str | None = None) -> np.ndarray:
    """The pixels of an image file, converted to ``mode`` (as stored when None); a DatasetError naming the file
    when it is missing, truncated or not an image."""
    if not path.is_file():
        raise DatasetError(f"file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert(mode) if mode else im)
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
