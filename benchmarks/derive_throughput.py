"""Step B's throughput per worker, at each shipped model size: the time of one image's multi-exit pass
(backbone and encoder once, the decoder and post-processing per exit, the panoptic statistics), with one
thread as a derive task runs (``cpus_per_task: 1``), and what that makes of a 118k-image derive.

The weights are random (no training is needed to time the arithmetic); post-processing and statistics are
timed on what such a parent predicts, against its own deepest exit as the ground truth, so their cost is
of the right order but not a trained parent's. Two views per image, as derive's default.

    python benchmarks/derive_throughput.py [--models tiny,small,swin-t] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

IMAGES = 118_000
VIEWS = 2


@torch.no_grad()
def per_image_seconds(name: str, repeats: int, batch: int = 1) -> dict:
    from eco_ray.metrics.panoptic import CategorySet, image_stats
    from eco_ray.model.config import load_model_config
    from eco_ray.model.early_exit import EarlyExitMask2Former
    from eco_ray.model.postprocess import to_panoptic

    torch.manual_seed(0)
    cfg = load_model_config(name)
    model = EarlyExitMask2Former(cfg).eval()
    size = cfg.image_size
    cats = CategorySet([{"id": i + 1, "name": str(i), "isthing": int(i < max(1, cfg.num_labels * 3 // 5))}
                        for i in range(cfg.num_labels)])
    x = torch.randn(batch, 3, size, size)
    times = {"forward": [], "postprocess": [], "stats": []}
    for r in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        out = model.forward_exits(x)
        t1 = time.perf_counter()
        preds = {k: to_panoptic(out[k], cats, (size, size)) for k in model.exits}
        t2 = time.perf_counter()
        gt = preds[model.exits[-1]]
        for k in model.exits:
            for (ids, segs), (gids, gsegs) in zip(preds[k], gt):
                image_stats(gids, gsegs, ids, segs, cats)
        t3 = time.perf_counter()
        if r:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(dt / batch)
    per = {k: min(v) for k, v in times.items()}  # the least disturbed repeat
    total = sum(per.values())
    return {"model": name, "image_size": size, "exits": model.exits, "batch": batch, "repeats": repeats,
            "forward_s": round(per["forward"], 4), "postprocess_s": round(per["postprocess"], 4),
            "stats_s": round(per["stats"], 4), "per_image_view_s": round(total, 4),
            "images_per_s_per_worker": round(1.0 / (total * VIEWS), 3),
            "derive_118k_cpu_core_hours": round(IMAGES * VIEWS * total / 3600, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,small,swin-t")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [per_image_seconds(m, args.repeats if m != "swin-t" else max(1, min(args.repeats, 2)))
            for m in args.models.split(",")]
    if args.json:
        from report import machine  # benchmarks/report.py

        print(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "threads": 1, "models": rows},
                         indent=2))
    else:
        for r in rows:
            print(f"{r['model']:>7} @ {r['image_size']:>4} px: {r['per_image_view_s'] * 1e3:9.1f} ms per image and view "
                  f"(forward {r['forward_s'] * 1e3:.1f}, post-processing {r['postprocess_s'] * 1e3:.1f}, statistics "
                  f"{r['stats_s'] * 1e3:.1f}); {r['images_per_s_per_worker']:.2f} images/s per 1-CPU worker; "
                  f"118k images x 2 views: {r['derive_118k_cpu_core_hours']:.1f} core-hours")
    return 0


if __name__ == "__main__":
    sys.exit(main())
