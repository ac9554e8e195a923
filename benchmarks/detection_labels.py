"""Which per-image quality can label a detection gate: cross-view reliability of the candidates.

COCO AP is a dataset metric; a gate needs a per-image, per-exit quality to learn from. A label that is pure
noise lets an oracle look good on the view it was computed on and nothing more, so each candidate is judged
as the panoptic labels were (docs/results.md, "Where depth pays"): its exits are chosen with the one decision
rule on the mirrored view (view 1) and scored on the plain view (view 0), the *cross-view oracle*; its lead
over the static line at the same encoder GFLOPs is what a gate could at best learn. The same-view oracle is
printed beside it to show how much of that is noise.

Candidates, per image i and exit k:
- ``ap``: COCO AP of image i alone at exit k (0 where undefined: no countable ground truth);
- ``ap50``: the same at IoU 0.5;
- ``dap``: the dataset AP with image i moved from the deepest exit to exit k, minus the dataset AP at the
  deepest exit (a linearised contribution, as the panoptic ``dpq``), times the number of images.

``ap`` and ``dap`` are computed as the derived table computes them (eco_ray.metrics.detection.DetectionRecords,
with the whole image set as one block); the pilot that chose ``dap`` for the table ran on this script.

    python benchmarks/detection_labels.py --parent models:/eco-det-parent/1 --data-root runs/data \
        [--tracking-uri URI] [--split val] [--max-images 300] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch

BETAS = (0.02, 0.05, 0.1, 0.3)


def per_image_ap50(records: dict, ids: list[int], exits: list[int]) -> np.ndarray:
    """(N, E) each image's own AP50 (0 where undefined): the one candidate the derived table does not keep."""
    from eco_ray.metrics.detection import accumulate

    q = np.zeros((len(ids), len(exits)))
    for e, k in enumerate(exits):
        for n, i in enumerate(ids):
            q[n, e] = max(0.0, accumulate({i: records[k][i]})["AP50"])
    return q


def main(argv=None) -> int:
    from eco_ray.data.coco_instances import CocoInstancesDataset
    from eco_ray.evaluate import evaluate_detector_exits
    from eco_ray.metrics.detection import DetectionRecords, assignment_ap
    from eco_ray.model.cost import count_exit_gflops
    from eco_ray.model.io import load_parent
    from eco_ray.tracking import default_tracking_uri, resolve_model_dir
    from eco_ray.tradeoff import choose

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", required=True)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--tracking-uri")
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-images", type=int, default=300)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    model, meta = load_parent(resolve_model_dir(args.parent, args.tracking_uri or default_tracking_uri("runs")),
                              task="detection")
    ds = CocoInstancesDataset.from_root(args.data_root, args.split)
    indices = range(min(args.max_images, len(ds)))
    t0 = time.perf_counter()
    views = [evaluate_detector_exits(model, ds, indices=indices, flip=flip) for flip in (False, True)]
    eval_s = time.perf_counter() - t0
    exits, ids = views[0].exits, sorted(int(i) for i in views[0].image_ids)  # the records' order
    gflops = np.array([row["encoder_gflops"] for row in count_exit_gflops(model, model.config.image_size)["exits"]])
    rel = gflops / gflops[-1]
    records = [v.records for v in views]
    static = np.array([assignment_ap(records[0], {i: k for i in ids})["AP"] for k in exits])

    def lead(choice: np.ndarray) -> tuple[float, float]:
        got = assignment_ap(records[0], {i: exits[c] for i, c in zip(ids, choice)})["AP"]
        cost = float(gflops[choice].mean())
        return got - float(np.interp(cost, gflops, static)), cost

    t0 = time.perf_counter()
    # ap and dap as the derived table computes them (one block: the contribution to the AP of all the images)
    flat = DetectionRecords.from_matches(records)
    own, dap = flat.per_image_ap(), flat.contributions(block=len(ids))
    labels = {"ap": [own[:, 0], own[:, 1]], "ap50": [per_image_ap50(r, ids, exits) for r in records],
              "dap": [dap[:, 0], dap[:, 1]]}
    label_s = time.perf_counter() - t0
    result = {"parent": args.parent, "split": args.split, "images": len(ids), "exits": exits,
              "encoder_gflops": gflops.tolist(), "static_ap_view0": static.tolist(),
              "static_ap_view1": [assignment_ap(records[1], {i: k for i in ids})["AP"] for k in exits],
              "labels": {}, "seconds": {"evaluate_two_views": eval_s, "labels": label_s},
              "machine": platform.processor() or platform.machine()}
    print(f"{len(ids)} {args.split} images, exits {exits}; static AP (view 0) "
          + ", ".join(f"{k}: {a:.4f}" for k, a in zip(exits, static)))
    for name, (q0, q1) in labels.items():
        # how far the views agree on what depth changes: per exit, the correlation of q[:, k] - q[:, deepest]
        agree = []
        for e in range(len(exits) - 1):
            a, b = q0[:, e] - q0[:, -1], q1[:, e] - q1[:, -1]
            agree.append(float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan"))
        rows = []
        for beta in BETAS:
            same, cross = lead(choose(q0, rel, beta)), lead(choose(q1, rel, beta))
            rows.append({"beta": beta, "same_view_lead": same[0], "cross_view_lead": cross[0],
                         "cross_view_encoder_gflops": cross[1]})
        result["labels"][name] = {"view_correlation_of_depth_change": dict(zip(map(str, exits[:-1]), agree)),
                                  "oracles": rows}
        print(f"  {name:5s} view agreement on the change from exit {exits[-1]}: "
              + ", ".join(f"{k}: {c:+.2f}" for k, c in zip(exits[:-1], agree)))
        for r in rows:
            print(f"        beta {r['beta']:<5} cross-view lead {r['cross_view_lead']:+.4f} at "
                  f"{r['cross_view_encoder_gflops']:.4f} GFLOPs   same-view lead {r['same_view_lead']:+.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
