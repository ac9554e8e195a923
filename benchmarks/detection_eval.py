"""COCO AP of one exit assignment: assembled from per-image matching records vs a full pycocotools COCOeval.

Two assembled forms are timed: per-image records in a dict (``assignment_ap``) and the flat records of the
derived table's form (``DetectionRecords.ap``).

The sweep and the selection score thousands of assignments (one per gate and trade-off); a full COCOeval
re-matches every image each time, the assembled evaluation only accumulates records matched once per exit.
Detections come from ``eco_ray.testing.coco_scene`` (noisy jittered truths plus false positives, up to the
100 per image a DETR's post-processing keeps), so the matching work is of the right order; the two results
are compared number by number in every run.

    python benchmarks/detection_eval.py [--images 300] [--exits 5] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np


def main(argv=None) -> int:
    from eco_ray.metrics.detection import STAT_NAMES, DetectionRecords, assignment_ap, coco_eval, match_images
    from eco_ray.testing.coco_scene import random_detection_scene

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--exits", type=int, default=5)
    ap.add_argument("--false-positives", type=int, default=95, help="at most this many per image and exit")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)

    gt, per_exit = random_detection_scene(0, n_images=args.images, n_exits=args.exits, categories=6,
                                          false_positives=args.false_positives)
    t0 = time.perf_counter()
    records = {k: match_images(gt, dets) for k, dets in enumerate(per_exit)}
    match_s = time.perf_counter() - t0
    flat_records = DetectionRecords.from_matches([records])  # the derived table's form
    ids = [im["id"] for im in gt["images"]]
    rng = np.random.default_rng(1)
    full, assembled, flat, worst = [], [], [], 0.0
    for _ in range(args.repeats):
        assignment = dict(zip(ids, rng.integers(0, args.exits, len(ids)).tolist()))
        chosen = [d for k, dets in enumerate(per_exit) for d in dets if assignment[d["image_id"]] == k]
        t0 = time.perf_counter()
        want = coco_eval(gt, chosen)
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = assignment_ap(records, assignment)
        assembled.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        from_flat = flat_records.ap(np.asarray([assignment[i] for i in flat_records.image_ids.tolist()]))
        flat.append(time.perf_counter() - t0)
        worst = max(worst, max(abs(got[n] - want[n]) for n in STAT_NAMES),
                    max(abs(from_flat[n] - want[n]) for n in STAT_NAMES))
    ratios = [f / a for f, a in zip(full, assembled)]
    flat_ratios = [f / a for f, a in zip(full, flat)]
    result = {
        "what": "COCO bbox AP of one random exit assignment: full COCOeval vs assembled from per-image records",
        "images": args.images, "exits": args.exits,
        "detections_per_image": sum(len(d) for d in per_exit) / (args.images * args.exits),
        "repeats": args.repeats,
        "full_cocoeval_s": {"median": statistics.median(full), "min": min(full), "max": max(full)},
        "assembled_s": {"median": statistics.median(assembled), "min": min(assembled), "max": max(assembled)},
        "speedup": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "flat_records_s": {"median": statistics.median(flat), "min": min(flat), "max": max(flat)},
        "flat_speedup": {"median": statistics.median(flat_ratios), "min": min(flat_ratios), "max": max(flat_ratios)},
        "matching_once_per_exit_s": match_s / args.exits,
        "largest_difference": worst,
        "machine": platform.processor() or platform.machine(),
    }
    print(f"{args.images} images, {result['detections_per_image']:.0f} detections per image and exit, "
          f"{args.repeats} assignments")
    print(f"  full COCOeval : median {result['full_cocoeval_s']['median'] * 1e3:8.1f} ms "
          f"(min {min(full) * 1e3:.1f}, max {max(full) * 1e3:.1f})")
    print(f"  assembled     : median {result['assembled_s']['median'] * 1e3:8.1f} ms "
          f"(min {min(assembled) * 1e3:.1f}, max {max(assembled) * 1e3:.1f})")
    print(f"  flat records  : median {statistics.median(flat) * 1e3:8.1f} ms (min {min(flat) * 1e3:.1f}, "
          f"max {max(flat) * 1e3:.1f}); speed-up median {statistics.median(flat_ratios):.1f}x "
          f"(min {min(flat_ratios):.1f}x, max {max(flat_ratios):.1f}x)")
    print(f"  speed-up      : median {result['speedup']['median']:.1f}x (min {min(ratios):.1f}x, max {max(ratios):.1f}x)"
          f"; matching once per exit {result['matching_once_per_exit_s']:.2f} s; largest difference {worst:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if worst <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
