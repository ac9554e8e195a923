"""Sample-level transforms (numpy + Pillow). Image bilinear, id map nearest, so segment ids survive."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from eco_ray.data.coco_panoptic import PanopticSample
from eco_ray.metrics.panoptic import VOID

Transform = Callable[[PanopticSample, np.random.Generator], PanopticSample]


def _resize(sample: PanopticSample, height: int, width: int) -> PanopticSample:
    if sample.image.shape[:2] == (height, width):
        return sample
    image = np.asarray(Image.fromarray(sample.image).resize((width, height), Image.BILINEAR))
    # int64 ids do not fit PIL's nearest-neighbour mode directly: resize an index map of the unique ids.
    uniq, inverse = np.unique(sample.id_map, return_inverse=True)
    index = Image.fromarray(inverse.reshape(sample.id_map.shape).astype(np.int32), mode="I")
    id_map = uniq[np.asarray(index.resize((width, height), Image.NEAREST))]
    return _drop_vanished(replace(sample, image=image, id_map=id_map))


def _drop_vanished(sample: PanopticSample) -> PanopticSample:
    """Segments that no longer cover a pixel (after a resize or crop) leave segments_info too."""
    present = set(np.unique(sample.id_map).tolist()) - {VOID}
    segments = [s for s in sample.segments if s["id"] in present]
    return sample if len(segments) == len(sample.segments) else replace(sample, segments=segments)


class Resize:
    """Resize so the shorter side is ``size`` (``exact=True``: to size x size, ignoring aspect ratio)."""

    def __init__(self, size: int, exact: bool = False):
        self.size, self.exact = size, exact

    def __call__(self, sample: PanopticSample, rng: np.random.Generator) -> PanopticSample:
        h, w = sample.id_map.shape
        if self.exact:
            return _resize(sample, self.size, self.size)
        scale = self.size / min(h, w)
        return _resize(sample, max(self.size, round(h * scale)), max(self.size, round(w * scale)))


class Crop:
    """Crop to size x size, at random (training) or from the centre (evaluation)."""

    def __init__(self, size: int, random: bool = True):
        self.size, self.random = size, random

    def __call__(self, sample: PanopticSample, rng: np.random.Generator) -> PanopticSample:
        h, w = sample.id_map.shape
        if h < self.size or w < self.size:
            raise ValueError(f"image {sample.image_id} is {w}x{h}, smaller than the crop {self.size}; resize first")
        y = rng.integers(0, h - self.size + 1) if self.random else (h - self.size) // 2
        x = rng.integers(0, w - self.size + 1) if self.random else (w - self.size) // 2
        sl = (slice(y, y + self.size), slice(x, x + self.size))
        return _drop_vanished(replace(sample, image=sample.image[sl], id_map=sample.id_map[sl]))


class HorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, sample: PanopticSample, rng: np.random.Generator) -> PanopticSample:
        if rng.random() >= self.p:
            return sample
        return replace(sample, image=sample.image[:, ::-1].copy(), id_map=sample.id_map[:, ::-1].copy())


class Compose:
    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, sample: PanopticSample, rng: np.random.Generator) -> PanopticSample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample


def build_transform(size: int, train: bool, exact_resize: bool = False, hflip: bool = True) -> Compose:
    """Training: shorter side to ``size``, random crop, random flip. Evaluation: resize + centre crop."""
    steps: list[Transform] = [Resize(size, exact=exact_resize), Crop(size, random=train)]
    if train and hflip:
        steps.append(HorizontalFlip())
    return Compose(steps)
