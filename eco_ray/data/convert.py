"""COCO *instance* annotations (polygons, RLE) plus optional semantic PNGs -> COCO panoptic.

The rules (docs/data.md lists them with every count the summary reports):

- **Categories.** Every category of the instance file is a thing; stuff categories come from a separate list
  and the semantic PNGs. Id 0 and the background classes labelling tools export (``_background_``,
  ``__background__``) are void: dropped, with their annotations. Ids that are whole-number floats (``3.0``)
  become ints; any other non-integer id is an error.
- **Segmentations**, decoded by pycocotools: polygons (a list of ``[x1, y1, x2, y2, ...]``; one flat list of
  numbers is one polygon), uncompressed RLE (``counts`` a list) and compressed RLE (``counts`` a string).
  A polygon of fewer than 3 points is dropped; points outside the image are clipped when rasterised.
- **Overlaps.** Larger instances are painted first, smaller ones on top (a small object in front of a large
  one is the common case in real photos). An instance left with less than ``min_visible`` of its area, or
  with none, is dropped. The crowd annotations (``iscrowd=1``) of a category make one crowd segment (as COCO
  has, and panopticapi's matching assumes) on the pixels no instance covers. Pixels no instance covers take
  their stuff category from the semantic PNG (value = category id; 0 and 255 are void), one segment per stuff
  category.
- **RLE** must have the image's size and runs that cover it exactly (pycocotools fills a short one from
  uninitialised memory).
- **Checks.** Annotations of an image id the file does not list, and (given the image folder) image files
  that are missing or unreadable or whose size differs from the JSON's: a warning by default (the annotation
  or image left out; the file's own size used), an error with ``strict``.

Every failure is a :class:`DatasetError` naming the file, the entry and what to change.
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from eco_ray import files
from eco_ray.data.coco_panoptic import (
    DatasetError,
    coco_document,
    id2rgb,
    load_json,
    read_image,
    segments_from_id_map,
)
from eco_ray.metrics.panoptic import VOID

SEMANTIC_VOID = (0, 255)
BACKGROUND_NAMES = ("_background_", "__background__")
IMAGE_MODES = {"copy": "copied", "symlink": "linked"}
MARKER = ".eco-ray-convert"  # in a PNG folder this module wrote, and so may replace

# what each count of ConversionReport.counts means, in the order the summary prints them
COUNTS = {
    "void_category_annotations": "annotations of a void category (id 0 / background), left out",
    "orphan_annotations": "annotations of an image id the file does not list, left out",
    "missing_images": "images whose file is missing or unreadable, left out",
    "size_mismatches": "images whose file size differs from the JSON's (the file's size used)",
    "unannotated_images": "images without any annotation (kept: void, or stuff only)",
    "degenerate_polygons": "polygons of fewer than 3 points, dropped",
    "clipped_annotations": "annotations reaching outside the image, clipped",
    "empty_annotations": "annotations with an empty mask, left out",
    "occluded_instances": "instances partly covered by a smaller one in front",
    "hidden_instances": "instances covered entirely or below --min-visible, dropped",
    "hidden_crowds": "crowd regions covered entirely by instances, dropped",
    "crowd_segments": "crowd segments (the crowd annotations of a category in an image make one)",
}
STRICT = ("orphan_annotations", "missing_images", "size_mismatches")


@dataclass
class ConversionReport:
    """What a conversion wrote and every rule it applied, counted (see ``COUNTS``)."""

    panoptic: dict
    images: int = 0
    segments: int = 0
    void_categories: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    images_placed: int = 0

    def to_json(self) -> dict:
        return {"images": self.images, "segments": self.segments, "void_categories": self.void_categories,
                "images_placed": self.images_placed, "counts": {k: self.counts.get(k, 0) for k in COUNTS}}

    def warnings(self) -> list[str]:
        return [f"{COUNTS[k]}: {self.counts[k]}" for k in COUNTS if self.counts.get(k) and k != "crowd_segments"]


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Polygon list, uncompressed RLE (counts as a list) or compressed RLE -> (H, W) bool mask."""
    return _decode(segmentation, height, width, Counter())


def convert_instances_to_panoptic(
    instances_json: str | Path,
    out_json: str | Path,
    out_png_dir: str | Path,
    semantic_dir: str | Path | None = None,
    stuff_categories: Sequence[dict] = (),
    min_visible: float = 0.0,
    *,
    images_dir: str | Path | None = None,
    images_out: str | Path | None = None,
    image_mode: str = "copy",
    strict: bool = False,
) -> ConversionReport:
    """Write ``out_json`` and one id PNG per image into ``out_png_dir``. With ``images_dir`` (where the
    ``file_name`` of every image lies), the files are checked against the JSON and, with ``images_out``, copied
    or linked there under the same relative names (``image_mode``: copy or symlink)."""
    src = Path(instances_json)
    if image_mode not in IMAGE_MODES:
        raise DatasetError(f"image mode {image_mode!r}: use one of {', '.join(IMAGE_MODES)}")
    if images_out is not None and images_dir is None:
        raise DatasetError("placing images needs the folder they are in: give images_dir (--images)")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DatasetError(f"image folder not found: {images_dir}")
    if not 0 <= min_visible <= 1:
        raise DatasetError(f"min_visible is a share of an instance's area, 0 to 1; got {min_visible!r}")
    data = coco_document(src, load_json(src, "instance annotation file"), "COCO instance file")
    report = ConversionReport(panoptic={})
    thing_cats, void_ids = _thing_categories(src, data["categories"], report)
    stuff_cats = _stuff_categories(stuff_categories, {c["id"] for c in thing_cats})
    known = {c["id"] for c in thing_cats} | {c["id"] for c in stuff_cats}
    stuff_ids = {c["id"] for c in stuff_cats}

    images, missing = _images(src, data["images"], Path(images_dir) if images_dir is not None else None, strict,
                              report)
    by_image: dict[int, list[dict]] = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{src}: annotation {ann.get('id', f'#{i}') if isinstance(ann, dict) else f'#{i}'}"
        if not isinstance(ann, dict):
            raise DatasetError(f"{where}: an annotation must be an object, got {type(ann).__name__}")
        for key in ("image_id", "category_id", "segmentation"):
            if key not in ann:
                raise DatasetError(f"{where}: missing {key!r} (COCO instance annotations have image_id, "
                                   f"category_id, segmentation)")
        image_id = _whole(ann["image_id"], f"{where}: image_id")
        category_id = _whole(ann["category_id"], f"{where}: category_id")
        if category_id in void_ids or category_id == VOID:
            report.counts["void_category_annotations"] += 1
            continue
        if category_id not in known:
            raise DatasetError(f"{where}: unknown category {category_id}; add it to the file's categories "
                               f"(things) or to the stuff categories")
        iscrowd = ann.get("iscrowd", 0)
        if isinstance(iscrowd, str) or iscrowd not in (0, 1):
            raise DatasetError(f"{where}: iscrowd must be 0 or 1, got {iscrowd!r}")
        if image_id not in images:
            if image_id in missing:  # counted with its image
                continue
            report.counts["orphan_annotations"] += 1
            if strict:
                raise DatasetError(f"{where}: image id {image_id} is not among the file's images (strict); "
                                   f"add the image or drop the annotation")
            continue
        by_image.setdefault(image_id, []).append({**ann, "category_id": category_id, "iscrowd": int(iscrowd),
                                                  "_where": where})

    # everything is written into a staging folder first: a conversion that stops half-way (a malformed
    # annotation in image 9,000) leaves the previous output as it was, never new PNGs beside an old JSON
    out_json, out_png_dir = Path(out_json), Path(out_png_dir)
    if out_png_dir.exists() and (not out_png_dir.is_dir() or (any(out_png_dir.iterdir())
                                                              and not (out_png_dir / MARKER).is_file())):
        raise DatasetError(f"{out_png_dir} exists and is not an id-PNG folder this command wrote (it is replaced "
                           f"whole); remove it or write elsewhere")
    staging = out_png_dir.with_name(out_png_dir.name + ".partial")
    stems = Counter(PurePosixPath(im["file_name"]).stem for im in images.values())
    try:
        _remove(staging)
        staging.mkdir(parents=True)
        (staging / MARKER).write_text("written by eco-ray data convert; replaced whole by the next conversion\n")
        annotations = []
        for image in images.values():
            rel = PurePosixPath(image["file_name"])
            h, w = image["height"], image["width"]
            anns = by_image.get(image["id"], [])
            if not anns:
                report.counts["unannotated_images"] += 1
            id_map, category_of, crowd = _paint(anns, h, w, min_visible, report)
            if semantic_dir is not None:
                _paint_stuff(id_map, category_of, *_semantic_map(Path(semantic_dir), rel, h, w, stems[rel.stem] == 1),
                             stuff_ids, known)
            png_path = staging / image["png_name"]
            png_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(id2rgb(id_map)).save(png_path)
            segments = segments_from_id_map(id_map, category_of, crowd)
            report.segments += len(segments)
            annotations.append({"image_id": image["id"], "file_name": image["png_name"], "segments_info": segments})
        if images_out is not None:
            for image in images.values():
                rel = PurePosixPath(image["file_name"])
                _place_image(Path(images_dir) / rel, Path(images_out) / rel, image_mode)
                report.images_placed += 1
        out_json.unlink(missing_ok=True)  # no JSON rather than an old one beside the new PNGs
        _remove(out_png_dir)
        staging.replace(out_png_dir)
    except OSError as e:
        raise DatasetError(f"cannot write the output ({e.filename or out_png_dir}: {e.strerror or e})") from None
    finally:
        _remove(staging)

    categories = thing_cats + stuff_cats
    report.images = len(annotations)
    images_out_json = [{k: v for k, v in im.items() if k != "png_name"} for im in images.values()]
    report.panoptic = {"info": data.get("info", {}), "licenses": data.get("licenses", []),
                       "images": images_out_json, "annotations": annotations, "categories": categories}
    files.write_text(out_json, json.dumps(report.panoptic))
    return report


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _whole(value, what: str) -> int:
    """An id: an int, or a float with no fractional part (some exporters write ``3.0``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DatasetError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not float(value).is_integer():
        raise DatasetError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def _thing_categories(src: Path, categories: list, report: ConversionReport) -> tuple[list[dict], set[int]]:
    things, void_ids, seen = [], set(), set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DatasetError(f"{src}: category #{i} needs an id and a name, got {c!r}")
        cid = _whole(c["id"], f"{src}: category {c.get('name')!r} id")
        if cid in seen:
            raise DatasetError(f"{src}: category id {cid} appears twice")
        seen.add(cid)
        if cid == VOID or str(c["name"]).lower() in BACKGROUND_NAMES:
            void_ids.add(cid)
            report.void_categories.append(str(c["name"]))
            continue
        things.append({**c, "id": cid, "name": str(c["name"]), "isthing": 1})
    if not things:
        raise DatasetError(f"{src}: no thing category besides void/background ones")
    return things, void_ids


def _stuff_categories(stuff: Sequence[dict], thing_ids: set[int]) -> list[dict]:
    out = []
    if not isinstance(stuff, (list, tuple)):
        raise DatasetError(f"the stuff categories must be a JSON list of {{id, name}}, got {type(stuff).__name__}")
    for i, c in enumerate(stuff):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DatasetError(f"stuff category #{i} needs an id and a name, got {c!r}")
        cid = _whole(c["id"], f"stuff category {c.get('name')!r} id")
        if cid in SEMANTIC_VOID:
            raise DatasetError(f"stuff category {c['name']!r}: id {cid} means void in a semantic PNG; use another id")
        if cid in thing_ids or cid in {s["id"] for s in out}:
            raise DatasetError(f"stuff category {c['name']!r}: id {cid} is already used by another category")
        if c.get("isthing", 0) not in (0, False):
            raise DatasetError(f"stuff category {c['name']!r} has isthing={c['isthing']!r}; things come from the "
                               f"instance file")
        out.append({**c, "id": cid, "name": str(c["name"]), "isthing": 0})
    return out


def _images(src: Path, entries: list, images_dir: Path | None, strict: bool, report: ConversionReport
            ) -> tuple[dict[int, dict], set[int]]:
    """The image entries by id, ids and sizes as ints (the file's size where it differs), and the ids of the
    images left out because their file is missing."""
    images: dict[int, dict] = {}
    names: set[str] = set()
    png_names: dict[str, str] = {}
    missing: set[int] = set()
    for i, im in enumerate(entries):
        where = f"{src}: image #{i}"
        if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "height", "width")):
            raise DatasetError(f"{where}: an image entry needs id, file_name, height and width, got {im!r}")
        image_id = _whole(im["id"], f"{where}: id")
        name = str(im["file_name"])
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.name:
            raise DatasetError(f"{where}: file_name {name!r} must be a path relative to the image folder")
        if image_id in images:
            raise DatasetError(f"{where}: image id {image_id} appears twice")
        if name in names:
            raise DatasetError(f"{where}: file_name {name!r} appears twice")
        names.add(name)
        png_name = str(rel.with_suffix(".png"))
        if png_name in png_names:
            raise DatasetError(f"{where}: {name!r} and {png_names[png_name]!r} would share the id PNG {png_name!r}; "
                               f"rename one of them")
        png_names[png_name] = name
        h, w = _whole(im["height"], f"{where}: height"), _whole(im["width"], f"{where}: width")
        if h <= 0 or w <= 0:
            raise DatasetError(f"{where}: size {w}x{h} is empty")
        if images_dir is not None:
            size = _image_size(images_dir / rel)
            if size is None:
                report.counts["missing_images"] += 1
                missing.add(image_id)
                if strict:
                    raise DatasetError(f"{where}: {images_dir / rel} is missing or unreadable (strict); add the "
                                       f"file or drop the image from the JSON")
                continue
            if size != (w, h):
                report.counts["size_mismatches"] += 1
                if strict:
                    raise DatasetError(f"{where}: the JSON says {w}x{h}, {images_dir / rel} is "
                                       f"{size[0]}x{size[1]} (strict); correct width and height")
                w, h = size
        images[image_id] = {**im, "id": image_id, "file_name": name, "height": h, "width": w, "png_name": png_name}
    return images, missing


def _image_size(path: Path) -> tuple[int, int] | None:
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            im.verify()
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def _decode(segmentation, h: int, w: int, counts: Counter, where: str = "segmentation") -> np.ndarray:
    if isinstance(segmentation, list):
        polygons = [segmentation] if segmentation and all(isinstance(v, numbers.Real) for v in segmentation) \
            else segmentation
        kept = []
        for poly in polygons:
            if not isinstance(poly, list) or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                     for v in poly):
                raise DatasetError(f"{where}: a polygon is a list of numbers [x1, y1, x2, y2, ...], got {poly!r:.80}")
            if len(poly) % 2:
                raise DatasetError(f"{where}: a polygon has an odd number of coordinates ({len(poly)})")
            if len(poly) < 6:
                counts["degenerate_polygons"] += 1
                continue
            xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
            if xs.min() < 0 or ys.min() < 0 or xs.max() > w or ys.max() > h:
                counts["_clipped"] = 1
            kept.append([float(v) for v in poly])
        if not kept:
            return np.zeros((h, w), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(kept, h, w))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size, counts = segmentation["size"], segmentation["counts"]
        if size != [h, w]:
            raise DatasetError(f"{where}: RLE of size {size!r} for an image of height {h}, width {w} (the image "
                               f"file's size where it differs from the JSON's); an RLE must have [height, width]")
        try:
            if isinstance(counts, str):
                counts = counts.encode()
            if isinstance(counts, bytes):
                runs = rle_counts_from_string(counts.decode("ascii"))
            elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
                runs = counts
            else:
                raise DatasetError(f"{where}: RLE counts must be a list of integers or a COCO string")
            # pycocotools fills a mask whose runs do not cover it from uninitialised memory
            if any(v < 0 for v in runs):
                raise DatasetError(f"{where}: the RLE has negative run lengths")
            if sum(runs) != h * w:
                raise DatasetError(f"{where}: the RLE's runs cover {sum(runs)} pixels, the image has {h * w} "
                                   f"({h}x{w})")
            rle = mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w) if isinstance(counts, list) \
                else {"size": [h, w], "counts": counts}
            return mask_utils.decode(rle).astype(bool)
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001 - pycocotools raises bare Exceptions for malformed RLE
            raise DatasetError(f"{where}: cannot decode the RLE ({e})") from None
    else:
        raise DatasetError(f"{where}: a segmentation is polygons (a list of [x1, y1, ...]) or an RLE "
                           f"{{size, counts}}; got {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def rle_counts_from_string(text: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString: 5-bit groups with a
    continuation bit, each run after the second stored as the difference to the run two before)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise DatasetError("a compressed RLE string ends inside a number")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise DatasetError(f"a compressed RLE string holds the character {text[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _paint(anns: list[dict], h: int, w: int, min_visible: float, report: ConversionReport):
    """The instances of one image as an id map: larger first, smaller on top, crowds on what is left."""
    counts = report.counts
    decoded = []
    for ann in anns:
        flags = Counter()
        m = _decode(ann["segmentation"], h, w, flags, ann["_where"])
        counts["degenerate_polygons"] += flags["degenerate_polygons"]
        if not m.any():
            counts["empty_annotations"] += 1
            continue
        counts["clipped_annotations"] += flags["_clipped"]
        decoded.append((ann, m))
    id_map = np.zeros((h, w), np.int64)
    category_of: dict[int, int] = {}
    crowd: dict[int, int] = {}
    full_area: dict[int, int] = {}
    next_id = 1
    for ann, m in sorted((d for d in decoded if not d[0]["iscrowd"]), key=lambda d: -int(d[1].sum())):
        id_map[m] = next_id
        category_of[next_id] = ann["category_id"]
        full_area[next_id] = int(m.sum())
        next_id += 1
    ids, visible = np.unique(id_map, return_counts=True)
    visible_of = dict(zip(ids.tolist(), visible.tolist()))
    for seg_id, full in full_area.items():
        seen = visible_of.get(seg_id, 0)
        if seen == 0 or seen < min_visible * full:
            counts["hidden_instances"] += 1
            id_map[id_map == seg_id] = VOID
            category_of.pop(seg_id)
        elif seen < full:
            counts["occluded_instances"] += 1
    crowds: dict[int, np.ndarray] = {}  # one crowd segment per category, as COCO has (and pq_compute assumes)
    for ann, m in decoded:
        if ann["iscrowd"]:
            crowds[ann["category_id"]] = crowds.get(ann["category_id"], np.zeros_like(m)) | m
    for category_id, m in crowds.items():
        free = m & (id_map == VOID)
        if not free.any():
            counts["hidden_crowds"] += 1
            continue
        id_map[free] = next_id
        category_of[next_id] = category_id
        crowd[next_id] = 1
        counts["crowd_segments"] += 1
        next_id += 1
    return id_map, category_of, crowd


def _semantic_map(semantic_dir: Path, rel: PurePosixPath, h: int, w: int, stem_unique: bool
                  ) -> tuple[Path, np.ndarray]:
    """The semantic PNG of an image: at its file_name's relative path with ``.png``, or, where no other image
    has the same stem, at ``<stem>.png`` in the folder's top (the layout most exports use)."""
    path = semantic_dir / rel.with_suffix(".png")
    if not path.is_file() and stem_unique and (semantic_dir / (rel.stem + ".png")).is_file():
        path = semantic_dir / (rel.stem + ".png")
    if not path.is_file():
        raise DatasetError(f"semantic PNG not found: {path} (one per image, at its file_name's path with .png"
                           f"{', or its stem, which another image shares' if not stem_unique else ''})")
    sem = read_image(path)
    if sem.ndim != 2:
        raise DatasetError(f"{path}: a semantic PNG has one channel (value = stuff category id); this one has "
                           f"{sem.shape[2]}")
    if sem.shape != (h, w):
        raise DatasetError(f"{path}: {sem.shape[1]}x{sem.shape[0]}, the image is {w}x{h}")
    return path, sem


def _paint_stuff(id_map: np.ndarray, category_of: dict, path: Path, sem: np.ndarray, stuff_ids: set, known: set
                 ) -> None:
    next_id = int(id_map.max()) + 1
    for cat_id in np.unique(sem).tolist():
        if cat_id in SEMANTIC_VOID:
            continue
        if cat_id not in stuff_ids:
            if cat_id in known:  # thing pixels in the semantic map: instances already cover them
                continue
            raise DatasetError(f"{path}: value {cat_id} is not a stuff category id; add it to the stuff "
                               f"categories or map it to 0 (void)")
        free = (sem == cat_id) & (id_map == VOID)
        if free.any():
            id_map[free] = next_id
            category_of[next_id] = cat_id
            next_id += 1


def _place_image(src: Path, dst: Path, mode: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and dst.samefile(src) and (not dst.is_symlink() or mode == "symlink"):
        return  # the source itself (converting in place), or linked by an earlier run; a link asked to copy is replaced
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if mode == "symlink":
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)
