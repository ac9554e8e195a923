"""Random COCO instance ground truth and per-exit detections, for tests and benchmarks of the detection metrics."""

from __future__ import annotations

import numpy as np


def random_detection_scene(seed: int, n_images: int = 40, n_exits: int = 3, categories: int = 4,
                           false_positives: int = 5):
    """Ground truth with boxes in every COCO area range, crowd boxes and empty images, and per exit a
    different noisy detector: jittered truths, wrong classes, false positives, missed images, tied scores."""
    rng = np.random.default_rng(seed)
    images = [{"id": 10 + 3 * i, "width": 320, "height": 240, "file_name": f"{i}.png"} for i in range(n_images)]
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(categories)]
    anns, next_id = [], 1
    for im in images:
        for _ in range(rng.integers(0, 7)):
            side = float(rng.choice([rng.uniform(4, 30), rng.uniform(33, 95), rng.uniform(97, 200)]))
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, 320 - min(w, 319)), rng.uniform(0, 240 - min(h, 239))
            anns.append({"id": next_id, "image_id": im["id"], "category_id": int(rng.integers(1, categories + 1)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.08)})
            next_id += 1
    gt = {"images": images, "annotations": anns, "categories": cats}
    per_exit = []
    for k in range(n_exits):
        noise = 0.25 / (k + 1)
        dets = []
        for im in images:
            if rng.random() < 0.1:
                continue  # no detection at all for this image at this exit
            for a in (a for a in anns if a["image_id"] == im["id"]):
                if rng.random() < 0.2:
                    continue
                x, y, w, h = a["bbox"]
                jit = rng.normal(0, noise, 4) * [w, h, w, h]
                cat = a["category_id"] if rng.random() > 0.15 else int(rng.integers(1, categories + 1))
                dets.append({"image_id": im["id"], "category_id": cat, "score": float(np.round(rng.random(), 1)),
                             "bbox": [x + jit[0], y + jit[1], max(1.0, w + jit[2]), max(1.0, h + jit[3])]})
            for _ in range(rng.integers(0, false_positives + 1)):
                w, h = rng.uniform(5, 150, 2)
                dets.append({"image_id": im["id"], "category_id": int(rng.integers(1, categories + 1)),
                             "score": float(rng.random()), "bbox": [rng.uniform(0, 200), rng.uniform(0, 150), w, h]})
        per_exit.append(dets)
    return gt, per_exit
