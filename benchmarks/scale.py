"""The derived table, gate fits and sweeps at COCO scale, on a synthetic COCO-shaped table (no model).

For each size (training images; validation is COCO's 5,000): the sparse table (eco_ray.metrics.sparse) on
disk and in memory, the time to open it, and what one sweep trial spends: label making, the gate fit, the
exact evaluation, the whole trial (fit_and_evaluate with the sweep's held-out share), 1,000 bootstrap
resamples of the verdict on the training split, and the resident memory (PSS, so pages shared through the
memory-mapped files count once) of a real ``eco-ray sweep`` of 8 trials at concurrency 2, summed over every
process it starts. Beside it, as far as it fits, today's former dense layout (schema 1: float64/int64
(image, view, exit, category) lists in Parquet) measured in the same run: disk, memory, open time, and the
same label, evaluation and bootstrap steps on the dense arrays.

    python benchmarks/scale.py                       # 10k, 30k, 118k; dense at 10k and 30k
    python benchmarks/scale.py --sizes 2000 --dense-sizes 2000 --out /tmp/scale.json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from report import machine  # benchmarks/report.py: the machine every benchmark records

GB = 1e9
VAL_IMAGES = 5000


def disk_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / GB


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_pss_gb(root: int) -> float:
    """Proportional set size of ``root`` and all its descendants: shared pages (the mapped table) split
    between the processes that map them, so the sum counts them once."""
    kids, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total / GB


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def measure_sparse(root: Path, n: int) -> dict:
    from eco_ray.derive.table import DerivedDataset, relative_costs
    from eco_ray.diagnose.verdict import _Scorer
    from eco_ray.gate.config import GateConfig
    from eco_ray.gate.evaluate import evaluate_choice, fit_and_evaluate
    from eco_ray.gate.fit import fit_gate
    from eco_ray.tradeoff import exit_labels

    (ds, open_s) = timed(lambda: DerivedDataset.open(root))
    (splits, split_s) = timed(lambda: (ds.split("train"), ds.split("val")))
    train, val = splits
    memory = sum(s.stats.nbytes + s.gate_features.nbytes + s.image_ids.nbytes for s in splits) / GB
    train_memory = (train.stats.nbytes + train.gate_features.nbytes + train.image_ids.nbytes) / GB
    train_disk = sum((root / f"train.{part}.arrow").stat().st_size for part in ("images", "stats")) / GB
    rel = relative_costs(ds.costs("gflops"))
    cfg = GateConfig()  # the paper's classifier gate at its defaults (mini-batches above 16k rows)
    fit_gate(train.gate_features[:64], np.ones((64, len(ds.exits))), rel, ds.exits,
             GateConfig(epochs=2))  # torch's first call (thread pool, kernels) is not the fit's cost
    _, quality_s = timed(lambda: train.quality)  # once per process: per-image PQ from the sparse entries
    fit_part, held = train.hold_out(0.25)
    labels, labels_s = timed(lambda: exit_labels(fit_part.quality_of("pq"), rel, cfg.beta))
    gate, fit_s = timed(fit_gate, fit_part.gate_features, fit_part.quality_of("pq"), rel, ds.exits, cfg)
    from eco_ray.model.gates import decide

    choice = decide(gate, train.gate_features, rel, cfg.beta)
    _, eval_s = timed(evaluate_choice, train, ds.categories, ds.cost_columns(), choice, cfg.beta)
    # a whole trial as run_trial runs it (the table open and the per-image PQ cached in its process)
    fit, trial_s = timed(fit_and_evaluate, ds, cfg, [cfg.beta], "train", "val", holdout=0.25)
    scorer, bootstrap_static_s = timed(_Scorer, train.eval_stats, ds.costs("gflops"), ds.exits,
                                       ds.categories.isthing, 1000, 0)
    lead, bootstrap_lead_s = timed(scorer.lead, choice)
    return {"images": n, "val_images": len(val), "entries_per_image": round(train.stats.entries / n, 2),
            "table_disk_gb": round(disk_gb(root), 4), "table_memory_gb": round(memory, 4),
            "train_disk_gb": round(train_disk, 4), "train_memory_gb": round(train_memory, 4),
            "open_s": round(open_s + split_s, 4), "quality_s": round(quality_s, 3), "labels_s": round(labels_s, 4),
            "fit_s": round(fit_s, 3), "fit_steps": int(gate.steps), "eval_s": round(eval_s, 4),
            "trial_s": round(trial_s, 3), "trial_fit_s": round(fit.fit_seconds, 3),
            "trial_eval_s": round(fit.eval_seconds, 3),
            "bootstrap_s": round(bootstrap_static_s + bootstrap_lead_s, 3),
            "bootstrap_static_s": round(bootstrap_static_s, 3), "bootstrap_lead_s": round(bootstrap_lead_s, 3),
            "gate_val_pq": round(fit.evaluations[0].gate.pq, 4), "gate_lead_on_train": round(lead.lead, 4)}


def measure_sweep(root: Path, trials: int, concurrency: int) -> dict:
    """A real ``eco-ray sweep`` in a subprocess (local Ray, MLflow on SQLite), its process tree's PSS sampled
    every 0.5 s."""
    work = Path(tempfile.mkdtemp(prefix="eco-scale-sweep-"))
    cmd = [sys.executable, "-m", "eco_ray.cli", "sweep", "--derived", str(root), "--trials", str(trials),
           "--concurrency", str(concurrency), "--run-dir", str(work), "--name", "scale", "--json"]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, samples = 0.0, 0
    stop = threading.Event()

    def sample():
        nonlocal peak, samples
        while not stop.is_set():
            peak = max(peak, tree_pss_gb(proc.pid))
            samples += 1
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - t
    result = {"trials": trials, "concurrency": concurrency, "returncode": proc.returncode,
              "seconds": round(wall, 1), "peak_pss_gb": round(peak, 3), "samples": samples}
    if proc.returncode == 0:
        doc = json.loads(out[out.index("{"):])
        result.update({"complete": doc["complete"], "failed": doc["failed"], "front": len(doc["front"]),
                       "selected_on": doc["selection_split"], "sweep_seconds": doc["seconds"]})
    else:
        result["stderr_tail"] = err[-2000:]
    shutil.rmtree(work, ignore_errors=True)
    return result


def measure_dense(split_root: Path, n: int, work: Path) -> dict:
    """The schema-1 layout of the same table, read and used the way the dense code did."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from eco_ray.bootstrap import resample_counts, weighted_totals
    from eco_ray.derive.table import DerivedDataset, relative_costs
    from eco_ray.metrics.panoptic import per_image_pq
    from eco_ray.metrics.table import stats_from_arrow, stats_to_arrow
    from eco_ray.tradeoff import choose, evaluate_assignment, select_rows

    ds = DerivedDataset.open(split_root)
    train = ds.split("train")
    dense = train.dense_stats()
    table = stats_to_arrow(train.image_ids, dense)
    feats = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(train.gate_features).reshape(-1)),
                                              train.gate_features.shape[1])
    table = table.add_column(1, "gate_features", feats)
    path = work / "train.parquet"
    pq.write_table(table, path)
    del table
    memory = (sum(v.nbytes for v in dense.as_dict().values()) + train.gate_features.nbytes) / GB
    del dense
    t = time.perf_counter()
    _, dense = stats_from_arrow(pq.read_table(path))
    open_s = time.perf_counter() - t
    rel = relative_costs(ds.costs("gflops"))
    q, quality_s = timed(lambda: per_image_pq(dense).mean(1))
    choice = choose(q, rel, 0.05)
    plain = dense[:, 0]
    _, eval_s = timed(evaluate_assignment, plain, choice, ds.categories, ds.cost_columns(), ds.exits)
    w = np.vstack([np.ones((1, n), np.int64), resample_counts(n, 1000, 0)])
    _, static_s = timed(weighted_totals, plain, w)
    _, lead_s = timed(lambda: weighted_totals(select_rows(plain, choice), w))
    return {"images": n, "table_disk_gb": round(path.stat().st_size / GB, 4), "table_memory_gb": round(memory, 4),
            "open_s": round(open_s, 3), "quality_s": round(quality_s, 3), "eval_s": round(eval_s, 4),
            "bootstrap_s": round(static_s + lead_s, 3),
            "sweep_resident_gb_estimate": round(3 * memory, 3),
            "note": "train split only; sweep memory not run (the dense code is gone): estimated as three private "
                    "copies (the driver and two trial processes)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,30000,118000", help="training images per table (comma-separated)")
    ap.add_argument("--dense-sizes", default="10000,30000", help="sizes to also measure in the dense layout")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--no-sweep", action="store_true", help="skip the eco-ray sweep runs")
    ap.add_argument("--keep", help="keep the largest table in this directory (for eco-ray sweep by hand)")
    ap.add_argument("--out", default=f"benchmarks/results/{time.strftime('%Y-%m-%d')}/scale.json")
    args = ap.parse_args(argv)
    from eco_ray.derive.synthetic import write_synthetic_table

    sizes = [int(s) for s in args.sizes.split(",") if s]
    dense_sizes = {int(s) for s in args.dense_sizes.split(",") if s}
    doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "val_images": VAL_IMAGES,
           "sweep": {"trials": args.trials, "concurrency": args.concurrency, "space": "default", "holdout": 0.25},
           "sizes": [], "dense_baseline": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"eco-scale-{n}-"))
        root = work / "derived"
        _, write_s = timed(write_synthetic_table, root, n, VAL_IMAGES)
        row = {"write_s": round(write_s, 2), **measure_sparse(root, n)}
        print(f"[scale] {n:>7} images: {row['table_disk_gb']:.3f} GB on disk, trial {row['trial_s']:.2f} s "
              f"(fit {row['trial_fit_s']:.2f}, eval {row['trial_eval_s']:.2f}), bootstrap {row['bootstrap_s']:.1f} s",
              flush=True)
        if not args.no_sweep:
            sweep = measure_sweep(root, args.trials, args.concurrency)
            row["sweep_resident_gb"] = sweep["peak_pss_gb"]
            row["sweep"] = sweep
            print(f"[scale] {n:>7} images: sweep of {args.trials} trials {sweep['seconds']:.0f} s, peak PSS "
                  f"{sweep['peak_pss_gb']:.2f} GB (rc {sweep['returncode']})", flush=True)
        doc["sizes"].append(row)
        if n in dense_sizes:
            d = measure_dense(root, n, work)
            doc["dense_baseline"].append(d)
            print(f"[scale] {n:>7} images, dense: {d['table_disk_gb']:.3f} GB on disk, {d['table_memory_gb']:.3f} "
                  f"GB in memory, open {d['open_s']:.1f} s", flush=True)
        out.write_text(json.dumps(doc, indent=2))
        if args.keep and n == max(sizes):
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.move(str(root), args.keep)
        shutil.rmtree(work, ignore_errors=True)
    print(f"[scale] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
