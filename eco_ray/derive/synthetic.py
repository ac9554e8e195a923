"""A COCO-shaped derived table made without any model: for scale benchmarks and for trying a cluster's sweep
at COCO size before a parent is trained (pure numpy; writes the same files as ``eco-ray derive``).

The shape follows COCO panoptic: 133 categories (80 things, 53 stuff), ~11 segments per image drawn from a
long-tailed category popularity (things repeat within an image, stuff does not), a few false-positive
categories per image, 2 views and 5 exits. Each image has a hidden depth need in [0, 1]: at a shallow exit
its segments are matched less often the more depth it needs, and its gate input carries a noisy copy of
that need, so gates have something real (and imperfect) to learn. The numbers are not a model of any
parent's quality; the table's sparsity and sizes are what matter here.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from eco_ray.derive.table import DerivedSplit, split_summary, write_manifest, write_split
from eco_ray.metrics.panoptic import CategorySet
from eco_ray.metrics.sparse import STAT_NAMES, SparseStats, narrow

COCO_THINGS, COCO_STUFF = 80, 53
EXITS = [2, 3, 4, 5, 6]
VIEWS = ["plain", "flip"]
# the paper-scale parent's encoder cost per layer: `eco-ray cost --model swin-t --no-latency` counts 31.36 GFLOPs
# at exit 2 and 15.68 more per layer (1024 px); a change of scale only, relative costs are k / 6 either way
GFLOPS_PER_LAYER = 15.68


def coco_like_categories(things: int = COCO_THINGS, stuff: int = COCO_STUFF) -> CategorySet:
    return CategorySet([{"id": i + 1, "name": f"{'thing' if i < things else 'stuff'}-{i + 1}",
                         "isthing": int(i < things)} for i in range(things + stuff)])


def synthetic_split(name: str, images: int, categories: CategorySet, *, seed: int = 0, first_id: int = 1,
                    feature_dim: int = 256, segments_per_image: float = 11.0) -> DerivedSplit:
    """One split of ``images`` images, vectorised (about a second per 10k images)."""
    rng = np.random.default_rng(seed)
    c = len(categories)
    n_views, n_exits = len(VIEWS), len(EXITS)
    popularity = 1.0 / (np.arange(c) + 8.0)  # long-tailed, as COCO's category frequencies
    popularity = rng.permutation(popularity) / popularity.sum()
    # ground-truth segments, then the false-positive-only categories
    segs = rng.poisson(segments_per_image - 1, images) + 1
    seg_image = np.repeat(np.arange(images), segs)
    seg_cat = rng.choice(c, size=len(seg_image), p=popularity)
    keys, gt = np.unique(seg_image * c + seg_cat, return_counts=True)
    gt = np.where(categories.isthing[keys % c], gt, 1)  # a stuff category is one segment per image
    extra = rng.poisson(2.0, images)
    extra_keys = np.repeat(np.arange(images), extra) * c + rng.choice(c, size=int(extra.sum()), p=popularity)
    keys, where = np.unique(np.concatenate([keys, extra_keys]), return_index=True)
    gt = np.concatenate([gt, np.zeros(len(extra_keys), np.int64)])[where]
    image, category = keys // c, keys % c
    m = len(keys)

    need = rng.beta(2.0, 2.0, images)  # hidden depth need per image
    depth = np.linspace(0.0, 1.0, n_exits)  # exit position, shallow to deep
    # match probability per (entry, view, exit): falls with need at shallow exits; views add independent noise
    logit = (2.2 - 2.6 * need[image, None, None] * (1.0 - depth[None, None, :])
             + rng.normal(0, 0.35, (m, n_views, 1)) + rng.normal(0, 0.5, (m, 1, 1)))
    p_match = 1.0 / (1.0 + np.exp(-logit))
    gt3 = np.broadcast_to(gt[:, None, None], (m, n_views, n_exits))
    tp = rng.binomial(gt3, p_match)
    fn = gt3 - tp
    p_fp = np.clip(0.25 - 0.15 * depth[None, None, :] + 0.1 * need[image, None, None], 0.02, 0.6)
    fp = rng.binomial(np.where(gt3 > 0, 1 + gt3 // 3, 1), np.broadcast_to(p_fp, (m, n_views, n_exits)))
    mean_iou = np.clip(rng.normal(0.78, 0.06, (m, 1, 1)) + 0.06 * depth[None, None, :]
                       - 0.05 * need[image, None, None], 0.5, 0.98)
    iou_sum = tp * mean_iou
    area = np.rint(np.exp(rng.normal(8.5, 1.4, m))).astype(np.int64)[:, None, None] * (gt3 > 0)
    matched = np.where(gt3 > 0, tp / np.maximum(gt3, 1), 0.0)
    sem_inter = np.rint(area * (0.35 + 0.6 * matched * mean_iou)).astype(np.int64)
    fp_pixels = np.rint(fp * np.exp(rng.normal(6.5, 1.0, (m, 1, 1)))).astype(np.int64)
    sem_union = area + fp_pixels
    values = {"iou_sum": iou_sum, "tp": tp, "fp": fp, "fn": fn, "sem_inter": sem_inter, "sem_union": sem_union}
    nonzero = np.zeros(m, bool)
    for v in values.values():
        nonzero |= (v != 0).reshape(m, -1).any(1)
    image, category = image[nonzero], category[nonzero]
    values = {k: narrow(k, values[k][nonzero]) for k in STAT_NAMES}
    offsets = np.zeros(images + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(image, minlength=images))
    stats = SparseStats(offsets, category.astype(np.int32), values, c)

    direction = rng.normal(0, 1, feature_dim)
    direction /= np.linalg.norm(direction)
    noisy_need = need + rng.normal(0, 0.25, images)
    features = rng.normal(0, 1, (images, feature_dim)) + 3.0 * noisy_need[:, None] * direction[None, :]
    kinds = np.asarray(["coco-like"] * images, dtype=object)
    return DerivedSplit(name, np.arange(first_id, first_id + images, dtype=np.int64), list(EXITS), list(VIEWS),
                        stats, features.astype(np.float32), kinds, segs.astype(np.int64))


def write_synthetic_table(out: str | Path, train_images: int, val_images: int, *, seed: int = 0,
                          categories: CategorySet | None = None, feature_dim: int = 256) -> Path:
    """A complete derived-dataset directory (``train`` and ``val``), readable by every stage after derive."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    categories = categories or coco_like_categories()
    splits = {"train": synthetic_split("train", train_images, categories, seed=seed, feature_dim=feature_dim),
              "val": synthetic_split("val", val_images, categories, seed=seed + 1, first_id=train_images + 1,
                                     feature_dim=feature_dim)}
    for split in splits.values():
        write_split(out, split)
    costs = {"exits": [{"exit": k, "encoder_gflops": GFLOPS_PER_LAYER * k} for k in EXITS], "synthetic": True}
    write_manifest(out, {
        "key": f"synthetic-coco-{train_images}-{val_images}-{seed}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parent": {"uri": "synthetic:coco-like", "version": "", "sha256": ""},
        "data": {"synthetic": True, "train_images": train_images, "val_images": val_images, "seed": seed},
        "config": {"sufficient_tolerance": 0.02, "views": list(VIEWS)}, "exits": list(EXITS), "views": list(VIEWS),
        "categories": categories.to_coco(), "gate_input": "synthetic", "gate_input_dim": feature_dim, "costs": costs,
        "splits": {name: split_summary(split, categories, 0.02) for name, split in splits.items()},
    })
    return out

