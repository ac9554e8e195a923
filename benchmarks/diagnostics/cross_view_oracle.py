"""Usage: python benchmarks/diagnostics/cross_view_oracle.py runs/derived/<key>

How much of the oracle's lead over static depth is real: the usual oracle picks each validation image's exit
from the per-image PQ of the plain image and scores it on the same plain image, so it also profits from label
noise; the cross-view oracle picks from the flipped image (same content, independent noise) and scores on the
plain one (eco_ray.gate.report.cross_view_oracle_point). Both beside static depth at the same mean compute.
"""
import sys

import numpy as np

from eco_ray.derive.table import DerivedDataset, relative_costs
from eco_ray.gate.report import cross_view_oracle_point, oracle_point, static_at, static_baseline
from eco_ray.metrics.panoptic import per_image_pq

ds = DerivedDataset.open(sys.argv[1])
va = ds.split("val")
rel, cols = relative_costs(ds.costs("gflops")), ds.cost_columns()
static = static_baseline(va, ds.categories, cols)
print("static:", ", ".join(f"exit {p['exit']} {p['pq']:.4f}@{p['encoder_gflops_mean']:.4f}" for p in static))
for beta in (0.02, 0.05, 0.1, 0.3):
    for label, p in (("same view (usual oracle)", oracle_point(va, ds.categories, cols, rel, beta)),
                     ("other view (noise removed)", cross_view_oracle_point(va, ds.categories, cols, rel, beta))):
        base = static_at(static, p["encoder_gflops_mean"])
        print(f"beta {beta:<4} {label:<28} PQ {p['pq']:.4f} @ {p['encoder_gflops_mean']:.4f} GFLOPs; static at that "
              f"compute {base:.4f}; gain {p['pq'] - base:+.4f}")
# how much of an image's gain from depth is a property of the image: the same gain measured on the two views
q = per_image_pq(va.stats)  # (N, V, E)
gain = q[:, :, -1] - q[:, :, 0]
print(f"per-image PQ gain exit {va.exits[0]} -> {va.exits[-1]}: mean {gain[:, 0].mean():+.4f}; correlation between "
      f"the plain and the flipped image {np.corrcoef(gain[:, 0], gain[:, 1])[0, 1]:+.3f} (1 = all real, 0 = all noise)")
