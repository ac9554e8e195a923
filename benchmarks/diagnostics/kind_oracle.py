"""Usage: python benchmarks/diagnostics/kind_oracle.py runs/derived/<key> [split]

The most a gate that only recognises an image's generator kind (clean, camouflage, ...) could gain: every
assignment of one exit per kind, scored exactly from the derived statistics, against static depth at the
same mean compute. Kind-level depth need is what a pooled-feature gate can most plausibly learn; if even
this bound is near zero, the data gives the gate nothing to exploit at the kind level.
"""
import itertools
import sys

import numpy as np

from eco_ray.derive.table import DerivedDataset
from eco_ray.gate.report import evaluate_choice, static_at, static_baseline
from eco_ray.metrics.panoptic import aggregate

ds = DerivedDataset.open(sys.argv[1])
split = ds.split(sys.argv[2] if len(sys.argv) > 2 else "val")
cols = ds.cost_columns()
static = static_baseline(split, ds.categories, cols)
kinds = sorted(set(split.kinds))
rows = []
for alloc in itertools.product(range(len(split.exits)), repeat=len(kinds)):
    choice = np.array([alloc[kinds.index(k)] for k in split.kinds])
    p = evaluate_choice(split, ds.categories, cols, choice)
    assignment = dict(zip(kinds, (split.exits[a] for a in alloc)))
    rows.append((p["pq"] - static_at(static, p["encoder_gflops_mean"]), p, assignment))
print("static:", ", ".join(f"exit {p['exit']} {p['pq']:.4f}@{p['encoder_gflops_mean']:.4f}" for p in static))
for kind in kinds:
    sub = split.subset(split.kinds == kind)
    things = [aggregate(sub.eval_stats[:, e], ds.categories).pq_things for e in range(len(sub.exits))]
    print(f"  {kind:<11} ({len(sub)} images) PQ per exit:",
          " ".join(f"{p['exit']}:{p['pq']:.3f}" for p in static_baseline(sub, ds.categories, cols)),
          "| things:", " ".join(f"{k}:{t:.3f}" for k, t in zip(sub.exits, things)))
print("best kind -> exit assignments (gain over static at the same compute):")
for gain, p, assignment in sorted(rows, key=lambda r: -r[0])[:5]:
    print(f"  {gain:+.4f}  PQ {p['pq']:.4f} @ {p['encoder_gflops_mean']:.4f} GFLOPs  {assignment}")
