"""Procedural COCO-panoptic benchmark data, designed so that images need different encoder depths.

Why this exists and how it is designed: no real segmentation dataset can be downloaded where eco-ray is
built, and clutter alone does not make images need more encoder depth (in a prototype, depth 2 was as good
as depth 6 on 85% of images; docs/results.md). So every image draws two things independently:

- a *clutter level* d in [0, 1] (uniform): from one large object, no overlap (d=0), to many small,
  overlapping, partly hidden objects (d=1). Object count, size and occlusion follow d alone, so the same
  clutter distribution holds for every kind and "kind" is not confounded with clutter;
- a *kind*, which sets what it takes to classify and delineate the things:
  - ``clean``: four shape classes (circle, square, triangle, ring) in colours that contrast with the
    background; local appearance suffices;
  - ``camouflage`` (weight 0 by default: it slowed the learning of the things and gave no image-level depth
    need): the same shape classes, filled with the texture of the stuff beneath them in a slightly shifted
    colour and phase; boundaries are subtle and need wider context;
  - ``relational``: identical grey hexagons ("gems") whose class, gem-warm or gem-cool, is set only by
    the colour of one small key marker placed far away (at least ``key_min_distance`` x image size from
    every gem). Local appearance says nothing: the class must travel across the image, which is what
    the deformable-attention encoder's layers do;
  - ``outline``: the same shape classes drawn only as a thin contour; inside, the
    stuff beneath shows unchanged, yet the segment is the whole shape. Whether a pixel lies inside a
    contour is a property of the whole contour, not of the pixel's neighbourhood (the "insideness"
    problem), and the larger the shape, the farther it must travel: a candidate for depth that grows
    with object size rather than with clutter.

Stuff: 1 or 2 background regions split by a random line, each of a different class (gradient,
stripes with a 6-16 px period, checker with 5-10 px cells at 128 px: larger cells seen between things look
like bands and were taken for stripes). Images are written as PNG (lossless: JPEG would smear the thin
contours and camouflage cues).

Whether a kind really needs depth is measured in Step B (the shallowest sufficient exit per image);
the knobs below exist to tune the mix when it does not. Deterministic for a seed: image i of a split
draws from its own generator seeded by (seed, split, i), whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from eco_ray.data.coco_instances import (
    instance_annotations,
    instances_document,
    instances_path,
    write_instances_from_panoptic,
)
from eco_ray.data.coco_panoptic import id2rgb, segments_from_id_map

SHAPES = ("circle", "square", "triangle", "ring")
GEMS = ("gem-warm", "gem-cool")
STUFF = ("gradient", "stripes", "checker")
KINDS = ("clean", "camouflage", "relational", "outline")
KEY_COLOURS = {"gem-warm": (235, 60, 30), "gem-cool": (30, 90, 235)}
GEM_GREY = 150

# Category ids: things 1..6, stuff 7..9 (0 is void in the panoptic format).
CATEGORIES = (
    [{"id": i + 1, "name": n, "isthing": 1, "supercategory": "shape"} for i, n in enumerate(SHAPES)]
    + [{"id": len(SHAPES) + i + 1, "name": n, "isthing": 1, "supercategory": "gem"} for i, n in enumerate(GEMS)]
    + [{"id": len(SHAPES) + len(GEMS) + i + 1, "name": n, "isthing": 0, "supercategory": "stuff"}
       for i, n in enumerate(STUFF)]
)
_CAT_ID = {c["name"]: c["id"] for c in CATEGORIES}
THING_IDS = {c["id"] for c in CATEGORIES if c["isthing"]}
_SPLIT_CODE = {"train": 1, "val": 2}


@dataclass
class SynthConfig:
    """Knobs of the generator. Sizes are in pixels unless they say 'fraction'."""

    size: int = 128
    seed: int = 0
    # the whole mix, relative weights; a mix given in a file or --set replaces this one (kinds not named: none)
    kind_mix: dict[str, float] = field(default_factory=lambda: {"clean": 0.4, "outline": 0.3, "relational": 0.3})
    min_objects: int = 1
    max_objects: int = 8
    max_radius_fraction: float = 0.25  # object radius at clutter 0, as a fraction of the image size
    min_radius_fraction: float = 0.11  # object radius at clutter 1 (smaller circles and squares, ~7 px, were
    # confused both ways)
    max_overlap: float = 0.45  # at clutter 1: most of a new object that may lie on earlier ones
    min_visible: float = 0.5  # every object keeps at least this fraction of its own pixels visible
    key_min_distance: float = 0.35  # relational: key marker to nearest gem, as a fraction of the size
    key_arm: float = 0.025  # relational: the plus-shaped key's unit as a fraction of the size (>= 2 px): the
    # plus is 4 units long and 1.4 wide
    camouflage_shift: float = 40.0  # camouflage: colour offset of the object from the stuff beneath
    noise: float = 6.0  # per-pixel Gaussian noise (0-255 scale)
    outline_width: float = 2.0  # outline: contour width in pixels at size 128 (scaled with the size)

    def validate(self) -> None:
        if self.size < 32:
            raise ValueError(f"size must be >= 32, got {self.size}")
        unknown = set(self.kind_mix) - set(KINDS)
        if unknown:
            raise ValueError(f"kind_mix has unknown kinds {sorted(unknown)}; known: {list(KINDS)}")
        if any(v < 0 for v in self.kind_mix.values()) or sum(self.kind_mix.values()) <= 0:
            raise ValueError(f"kind_mix weights must be >= 0 with a positive sum, got {self.kind_mix}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_radius_fraction <= self.max_radius_fraction <= 0.5:
            raise ValueError("need 0 < min_radius_fraction <= max_radius_fraction <= 0.5")
        for name in ("max_overlap", "min_visible", "key_min_distance", "key_arm"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------- drawing
class _Canvas:
    def __init__(self, size: int):
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.size, self.yy, self.xx = size, yy, xx

    def rotated(self, cx, cy, angle):
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = self.xx - cx, self.yy - cy
        return c * dx + s * dy, -s * dx + c * dy


def _random_colour(rng, lo=20, hi=235) -> np.ndarray:
    return rng.uniform(lo, hi, 3).astype(np.float32)


def _contrasting_colour(rng, other: np.ndarray, min_l1: float = 150.0) -> np.ndarray:
    """A colour at least ``min_l1`` (sum of channel differences) from ``other``: a stripe or checker pattern
    in two near-equal colours would look flat and make the stuff classes ambiguous."""
    for _ in range(50):
        c = _random_colour(rng)
        if np.abs(c - other).sum() >= min_l1:
            return c
    return (255.0 - other).astype(np.float32)


def _stuff_texture(canvas: _Canvas, name: str, rng, params: dict | None = None) -> tuple[np.ndarray, dict]:
    """(H, W, 3) float texture of a stuff class; ``params`` reproduces one (used for camouflage)."""
    if params:
        p = dict(params)
    else:
        a = _random_colour(rng)
        p = {"a": a, "b": _contrasting_colour(rng, a), "angle": rng.uniform(0, math.pi),
             "period": rng.uniform(6, 16) * canvas.size / 128, "phase": rng.uniform(0, 2 * math.pi)}
    u, v = canvas.rotated(canvas.size / 2, canvas.size / 2, p["angle"])
    period = p["period"]
    if name == "checker":  # cells of 5-10 px at 128 px: a piece seen between things shows squares, not bands
        period = canvas.size / 128 * 5 + (period - 6 * canvas.size / 128) / 2
    if name == "gradient":
        t = (u / canvas.size + 0.5).clip(0, 1)
    elif name == "stripes":
        t = (np.sin(2 * math.pi * u / p["period"] + p["phase"]) > 0).astype(np.float32)
    elif name == "checker":
        t = ((np.floor(u / period + p["phase"]) + np.floor(v / period)) % 2).astype(np.float32)
    else:
        raise ValueError(name)
    return p["a"] + (p["b"] - p["a"]) * t[..., None], p


def _shape_mask(canvas: _Canvas, shape: str, cx, cy, r, angle) -> np.ndarray:
    u, v = canvas.rotated(cx, cy, angle)
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        h = 0.8 * r
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape in ("triangle", "hexagon"):
        n = 3 if shape == "triangle" else 6
        inner = r * math.cos(math.pi / n)  # apothem of the regular polygon with circumradius r
        mask = np.ones_like(u, dtype=bool)
        for k in range(n):
            a = 2 * math.pi * k / n
            mask &= u * math.cos(a) + v * math.sin(a) <= inner
        return mask
    raise ValueError(shape)


# --------------------------------------------------------------------------------------------- one image
def generate_image(cfg: SynthConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray, dict[int, int], dict]:
    """-> (image uint8 (S,S,3), id map (S,S), category of each segment id, per-image metadata).

    An image that could not place ``min_objects`` things (a crowded draw) is drawn again, deterministically."""
    for attempt in range(20):
        rng = np.random.default_rng([cfg.seed, _SPLIT_CODE.get(split, 99), index, attempt])
        out = _draw_image(cfg, rng)
        if out[3]["eco_num_objects"] >= cfg.min_objects:
            return out
    raise RuntimeError(f"could not place {cfg.min_objects} objects in image {index} of {split}: "
                       f"lower min_objects or the object size")


def _draw_image(cfg: SynthConfig, rng: np.random.Generator):
    s = cfg.size
    canvas = _Canvas(s)
    kinds, weights = zip(*sorted(cfg.kind_mix.items()))
    kind = str(rng.choice(kinds, p=np.array(weights) / sum(weights)))
    clutter = float(rng.uniform())

    # stuff: one region, or two split by a random line, of different classes
    n_regions = 1 if rng.uniform() < 0.4 else 2
    stuff_names = list(rng.choice(STUFF, size=n_regions, replace=False))
    region = np.zeros((s, s), np.int64)
    if n_regions == 2:
        u, _ = canvas.rotated(rng.uniform(0.3, 0.7) * s, rng.uniform(0.3, 0.7) * s, rng.uniform(0, 2 * math.pi))
        region = (u > 0).astype(np.int64)
    image = np.zeros((s, s, 3), np.float32)
    stuff_params = []
    for k, name in enumerate(stuff_names):
        tex, params = _stuff_texture(canvas, name, rng)
        image[region == k] = tex[region == k]
        stuff_params.append(params)
    background = image.copy()  # the stuff alone: an outline shape shows it inside its contour

    # things
    n_obj = int(round(cfg.min_objects + clutter * (cfg.max_objects - cfg.min_objects)))
    radius_hi = s * (cfg.max_radius_fraction - clutter * (cfg.max_radius_fraction - cfg.min_radius_fraction))
    radius_lo = max(3.0, 0.75 * radius_hi)
    max_overlap = cfg.max_overlap * clutter
    key = None
    if kind == "relational":
        gem_class = str(rng.choice(GEMS))
        # the key lies in the outer band of the image, so that gems fit at the required distance from it
        along, across = rng.uniform(0.08, 0.92) * s, rng.uniform(0.06, 0.2) * s
        side = int(rng.integers(4))
        key = [(along, across), (along, s - across), (across, along), (s - across, along)][side]
    owner = np.zeros((s, s), np.int64)  # 0 = stuff, k = thing k
    full_masks: dict[int, np.ndarray] = {}
    category_of: dict[int, int] = {}
    placed = 0
    for _ in range(n_obj * 30):  # bounded retries: crowded images may end with fewer objects
        if placed == n_obj:
            break
        r = rng.uniform(radius_lo, radius_hi)
        cx, cy = rng.uniform(r * 0.6, s - r * 0.6), rng.uniform(r * 0.6, s - r * 0.6)
        if key is not None and math.hypot(cx - key[0], cy - key[1]) < cfg.key_min_distance * s + r:
            continue
        shape = "hexagon" if kind == "relational" else str(rng.choice(SHAPES))
        mask = _shape_mask(canvas, shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
        area = int(mask.sum())
        if area < 12:
            continue
        if (owner[mask] > 0).sum() > max_overlap * area:
            continue
        if any((m & ~mask & (owner == k)).sum() < cfg.min_visible * m.sum() for k, m in full_masks.items()):
            continue
        placed += 1
        owner[mask] = placed
        full_masks[placed] = mask
        category_of[placed] = _CAT_ID[gem_class if kind == "relational" else shape]
        if kind == "outline":
            fill = background.copy()  # hides earlier contours under this shape, as an opaque object would
            width = max(1, round(cfg.outline_width * s / 128))
            fill[_contour(mask, width)] = _contrasting_colour(rng, image[mask].mean(0), 180.0)
        else:
            fill = _thing_fill(cfg, canvas, kind, rng, image[mask].mean(0), region, stuff_names, stuff_params, cx, cy)
        image[mask] = fill[mask]

    if key is not None:  # a small plus sign, part of the stuff beneath it (not a segment)
        kx, ky, arm = key[0], key[1], max(2.0, cfg.key_arm * s)
        plus = ((np.abs(canvas.xx - kx) <= arm * 2) & (np.abs(canvas.yy - ky) <= arm * 0.7)) | \
               ((np.abs(canvas.yy - ky) <= arm * 2) & (np.abs(canvas.xx - kx) <= arm * 0.7))
        plus &= owner == 0
        image[plus] = KEY_COLOURS[gem_class]

    if cfg.noise > 0:
        image += rng.normal(0, cfg.noise, image.shape).astype(np.float32)
    image = image.clip(0, 255).round().astype(np.uint8)

    id_map = owner.copy()
    for k, name in enumerate(stuff_names):
        stuff_id = placed + 1 + k
        sel = (owner == 0) & (region == k)
        if sel.any():
            id_map[sel] = stuff_id
            category_of[stuff_id] = _CAT_ID[name]
    meta = {"eco_kind": kind, "eco_clutter": round(clutter, 4), "eco_num_objects": placed}
    return image, id_map, category_of, meta


def _contour(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` 4-neighbour steps of its border (the image edge is no border)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def _thing_fill(cfg: SynthConfig, canvas: _Canvas, kind: str, rng, under: np.ndarray, region, stuff_names,
                stuff_params, cx, cy) -> np.ndarray:
    """(H, W, 3) fill of one thing; ``under`` is the mean colour of the image beneath it."""
    if kind == "relational":  # identical for every gem: only the key tells the class
        return np.full((canvas.size, canvas.size, 3), GEM_GREY, np.float32) + 8 * np.sin(canvas.xx / 3.0)[..., None]
    if kind == "camouflage":  # the texture of the stuff beneath, slightly shifted in colour and phase
        k = int(region[int(np.clip(cy, 0, canvas.size - 1)), int(np.clip(cx, 0, canvas.size - 1))])
        params = dict(stuff_params[k])
        shift = cfg.camouflage_shift * rng.choice([-1.0, 1.0], 3).astype(np.float32)
        params["a"], params["b"] = params["a"] + shift, params["b"] + shift
        params["phase"] = params["phase"] + math.pi / 2
        return _stuff_texture(canvas, stuff_names[k], rng, params)[0]
    # clean: one flat colour far from what lies beneath (striped shapes get confused with the stripes stuff)
    colour = _contrasting_colour(rng, under, 180.0)
    return np.broadcast_to(colour, (canvas.size, canvas.size, 3)).copy()


# ----------------------------------------------------------------------------------------------- dataset
def _encode_one(args) -> tuple[dict, dict, list[dict]]:
    cfg, split, index, out, instances = args
    image, id_map, category_of, meta = generate_image(cfg, split, index)
    image_id = index + 1
    name = f"{image_id:012d}.png"
    Image.fromarray(image).save(out / split / name, compress_level=1)
    Image.fromarray(id2rgb(id_map)).save(out / "annotations" / f"panoptic_{split}" / name, compress_level=1)
    image_entry = {"id": image_id, "file_name": name, "width": cfg.size, "height": cfg.size, **meta}
    segments = segments_from_id_map(id_map, category_of)
    ann = {"image_id": image_id, "file_name": name, "segments_info": segments}
    return image_entry, ann, instance_annotations(id_map, segments, image_id, THING_IDS) if instances else []


def write_dataset(out: str | Path, cfg: SynthConfig, splits: dict[str, int], workers: int | None = None,
                  progress=None, *, instances: bool = True) -> dict:
    """Write a COCO-panoptic dataset in the COCO 2017 layout, with COCO instance annotations of its things for
    the same scenes (``instances_<split>.json``); return a summary (counts, timing, histograms).

    ``instances=False`` writes the panoptic files only, so a panoptic-only run needs no pycocotools (their
    masks are RLE-encoded with it); ``data instances`` adds them later from the panoptic files."""
    cfg.validate()
    out = Path(out)
    workers = workers or min(4, os.cpu_count() or 1)
    summary = {"config": asdict(cfg), "splits": {}}
    t0 = time.perf_counter()
    for split, n in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"panoptic_{split}").mkdir(parents=True, exist_ok=True)
        jobs = [(cfg, split, i, out, instances) for i in range(n)]
        images, anns, instance_lists = [], [], []
        with ProcessPoolExecutor(workers) as pool:
            for k, (im, ann, inst) in enumerate(pool.map(_encode_one, jobs, chunksize=32)):
                images.append(im)
                anns.append(ann)
                instance_lists.append(inst)
                if progress and (k + 1) % 250 == 0:
                    progress(split, k + 1, n)
        info = {"description": "eco-ray synthetic panoptic benchmark", "generator": asdict(cfg), "split": split}
        doc = {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": CATEGORIES}
        (out / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(doc))
        plain = [{k: v for k, v in im.items() if k in ("id", "file_name", "width", "height") or k.startswith("eco_")}
                 for im in images]
        if instances:
            document = instances_document(plain, instance_lists, CATEGORIES, info)
            instances_path(out, split).write_text(json.dumps(document))
        summary["splits"][split] = describe(images)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


STAMP = "eco_ray_synth.json"  # written last: its presence means the dataset is complete


def ensure_dataset(out: str | Path, cfg: SynthConfig, splits: dict[str, int], *, overwrite: bool = False,
                   workers: int | None = None, progress=None) -> tuple[dict, bool]:
    """Write the dataset unless ``out`` already holds one made with the same settings; -> (summary, reused).

    A directory holding a different dataset is never overwritten silently."""
    from eco_ray.config import ConfigError

    out = Path(out)
    request = {"config": asdict(cfg), "splits": dict(splits)}
    stamp = out / STAMP
    if (out / "annotations").exists() and not overwrite:
        if stamp.is_file() and json.loads(stamp.read_text()).get("request") == request:
            for split in splits:  # a dataset written before the generator wrote instance files gains them
                if not instances_path(out, split).is_file():
                    write_instances_from_panoptic(out, split)
            return json.loads(stamp.read_text())["summary"], True
        raise ConfigError(f"{out} already holds a different dataset; pass --overwrite to replace it")
    if overwrite:
        import shutil

        for sub in ("annotations", *splits):
            shutil.rmtree(out / sub, ignore_errors=True)
        stamp.unlink(missing_ok=True)
    summary = write_dataset(out, cfg, splits, workers=workers, progress=progress)
    summary["disk_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    stamp.write_text(json.dumps({"request": request, "summary": summary}, indent=2))
    return summary, False


def describe(images: list[dict]) -> dict:
    """The number of images and, for generated ones only, histograms of their difficulty: objects per image
    and kind (other datasets lack those fields)."""
    out: dict = {"images": len(images)}
    if images and all("eco_kind" in im for im in images):
        out["objects_per_image"] = dict(sorted(Counter(im.get("eco_num_objects", -1) for im in images).items()))
        out["kinds"] = dict(sorted(Counter(im["eco_kind"] for im in images).items()))
    return out
