"""Usage: python benchmarks/diagnostics/gate_table.py runs/derived/<key> [--betas 0.02 0.1 0.3] [--set key=value ...]

The issue-5 validation table in one go: static depth, then the classification gate (one fit per beta) and
the quality gate (one fit) at each beta, the oracle and the cross-view oracle, each as PQ @ mean encoder
GFLOPs with its gain over the straight line between the two static exits around its compute, and the exit
histogram. ``--set`` passes GateConfig settings (e.g. hidden=32, quality=dpq) to both gates.
"""
import argparse

import numpy as np

from eco_ray.config import load_config
from eco_ray.derive.table import DerivedDataset, relative_costs
from eco_ray.gate.config import GateConfig
from eco_ray.gate.evaluate import cross_view_oracle_point, fit_and_evaluate
from eco_ray.results import static_at

ap = argparse.ArgumentParser()
ap.add_argument("derived")
ap.add_argument("--betas", type=float, nargs="+", default=[0.02, 0.1, 0.3])
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--train-split", default="train")
ap.add_argument("--eval-split", default="val")
args = ap.parse_args()

ds = DerivedDataset.open(args.derived)
val = ds.split(args.eval_split)
rel = relative_costs(ds.costs("gflops"))


def cell(p, static):
    """(text, gain over the static line)"""
    gain = p.pq - static_at(static, p.encoder_gflops_mean)
    return f"{p.pq:.4f} @ {p.encoder_gflops_mean:.4f} ({gain:+.4f}) {p.exit_histogram}", gain


rows = {}
for kind in ("classify", "quality"):
    cfg = load_config(GateConfig, overrides=[f"kind={kind}", *args.set])
    res = fit_and_evaluate(ds, cfg, args.betas, args.train_split, args.eval_split)
    static = res.static
    rows[kind] = [cell(e.gate, static) for e in res.evaluations]
    if "oracle" not in rows:  # the same for both gates
        rows["oracle"] = [cell(e.oracle, static) for e in res.evaluations]
rows["cross-view oracle"] = [cell(cross_view_oracle_point(val, ds.categories, ds.cost_columns(), rel, b), static)
                             for b in args.betas]
print(f"{len(ds.split(args.train_split))} {args.train_split} images to fit, {len(val)} {args.eval_split} images; "
      f"gate settings {args.set or 'default'}")
print("static: " + ", ".join(f"exit {p.exit} {p.pq:.4f} @ {p.encoder_gflops_mean:.4f}" for p in static))
for name, cells in rows.items():
    for beta, (text, _) in zip(args.betas, cells):
        print(f"{name:<18} beta {beta:<5g} {text}")
print("mean gain over the static line, gates:",
      {k: round(float(np.mean([gain for _, gain in rows[k]])), 4) for k in ("classify", "quality")})
