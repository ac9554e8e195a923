"""Benchmark for the sweep, in one run on this machine (real local Ray, real MLflow SQLite store):

1. throughput: trials per minute of `eco-ray sweep` with TPE at the given concurrency (target, issue 6:
   >= 60 per minute with concurrency 2 on the `small` derived dataset);
2. search quality for a fixed trial budget: the hypervolume of the (PQ up, mean encoder GFLOPs down)
   front reached by TPE, NSGA-II and random search, same seed, same space, same derived table.
   Reference point: PQ 0 and the deepest exit's GFLOPs x 1.05; the static-depth curve's hypervolume is
   printed beside it.

    python benchmarks/sweep.py --derived runs/derived/<key> [--trials 40] [--concurrency 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

from eco_ray.config import load_config
from eco_ray.context import RunContext
from eco_ray.derive.table import DerivedDataset
from eco_ray.sweep import SweepConfig, run_sweep
from eco_ray.tradeoff import hypervolume_2d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--derived", required=True)
    p.add_argument("--space", default="default")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "random"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import ray

    ds = DerivedDataset.open(args.derived)
    ref_cost = float(ds.costs("gflops")[-1]) * 1.05
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(include_dashboard=False, log_to_driver=False)
        ctx = RunContext.create(tmp, f"sqlite:///{tmp}/mlflow.db")
        for sampler in args.samplers:
            cfg = load_config(SweepConfig, overrides=[f"space={args.space}", f"trials={args.trials}",
                                                      f"concurrency={args.concurrency}", f"sampler={sampler}",
                                                      f"seed={args.seed}", "nsga2_population=10"])
            t0 = time.perf_counter()
            s = run_sweep(cfg, derived=args.derived, ctx=ctx, name=f"bench-{sampler}")
            wall = time.perf_counter() - t0
            pts = [t.metrics for t in s.trials if t.metrics is not None]
            results[sampler] = {
                "trials": s.complete, "failed": s.failed, "wall_s": round(wall, 2),
                "tune_s": s.seconds, "trials_per_minute": s.complete / s.seconds * 60,
                "hypervolume": hypervolume_2d([q["pq"] for q in pts], [q["encoder_gflops_mean"] for q in pts], 0.0,
                                              ref_cost),
                "front": [{"pq": f["pq"], "encoder_gflops_mean": f["encoder_gflops_mean"]} for f in s.front]}
        static = [p.to_json() for p in s.static]
        ray.shutdown()
    out = {"benchmark": "sweep", "machine": f"{platform.machine()} {platform.processor()}".strip(),
           "derived": args.derived, "parent": ds.manifest["parent"], "space": args.space, "trials": args.trials,
           "concurrency": args.concurrency, "seed": args.seed, "reference": {"pq": 0.0, "encoder_gflops": ref_cost},
           "static_hypervolume": hypervolume_2d([p["pq"] for p in static], [p["encoder_gflops_mean"] for p in static],
                                                0.0, ref_cost),
           "samplers": results}
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return
    print(f"sweep benchmark on {out['machine']}: {args.trials} trials per sampler, concurrency {args.concurrency}, "
          f"seed {args.seed}, derived table of {ds.manifest['parent'].get('uri')}")
    print(f"{'sampler':>8} {'trials/min':>11} {'hypervolume':>12} {'front':>6} {'failed':>7}")
    for name, r in results.items():
        print(f"{name:>8} {r['trials_per_minute']:>11.1f} {r['hypervolume']:>12.5f} {len(r['front']):>6} "
              f"{r['failed']:>7}")
    print(f"static-depth curve hypervolume: {out['static_hypervolume']:.5f} (reference PQ 0, {ref_cost:.4f} GFLOPs)")


if __name__ == "__main__":
    main()
