"""Benchmark for Steps B and C, in one run on this machine:

(a) derive time per image for ALL exits: one multi-exit pass (backbone and encoder once, every exit
    tapped) vs. one separate forward per exit; both include post-processing and the statistics, as
    `eco-ray derive` does; measured on the same validation images, batch by batch, interleaved;
(b) the cost of changing beta: a gate fit + the exact evaluation from the derived table, against one
    pass of the parent over the training split (the time per image of (a)'s one-pass path x the
    number of training images in the derived table). Target (issue 5): >= 100x cheaper.

    python benchmarks/derive_gate.py --derived runs/derived/<key> [--images 64] [--json]

The parent and data are the ones the derived dataset records in its manifest.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from eco_ray.data import CocoPanopticDataset
from eco_ray.data.collate import pixel_values
from eco_ray.data.transforms import build_transform
from eco_ray.derive.table import DerivedDataset
from eco_ray.gate.config import GateConfig
from eco_ray.gate.evaluate import fit_and_evaluate
from eco_ray.metrics.panoptic import image_stats
from eco_ray.model.io import load_parent
from eco_ray.model.postprocess import to_panoptic
from eco_ray.tracking import default_tracking_uri, resolve_model_dir


def _score(outputs: dict, samples, categories, size, threshold, mask_threshold) -> None:
    for k, out in outputs.items():
        for (id_map, segs), s in zip(to_panoptic(out, categories, (size, size), threshold, mask_threshold), samples):
            image_stats(s.id_map, s.segments, id_map, segs, categories)


@torch.no_grad()
def derive_ratio(model, dataset, images: int, batch: int, threshold: float, mask_threshold: float) -> dict:
    size = model.config.image_size
    transform = build_transform(size, train=False)
    rng = np.random.default_rng(0)
    one, sep = [], []
    for start in range(0, images, batch):
        samples = [transform(dataset[i], rng) for i in range(start, min(start + batch, images))]
        x = pixel_values([s.image for s in samples])
        t0 = time.perf_counter()
        _score(model.forward_exits(x), samples, dataset.categories, size, threshold, mask_threshold)
        t1 = time.perf_counter()
        _score({k: model(x, exit=k) for k in model.exits}, samples, dataset.categories, size, threshold, mask_threshold)
        t2 = time.perf_counter()
        one.append((t1 - t0) / len(samples))
        sep.append((t2 - t1) / len(samples))
    return {"images": images, "batch": batch, "one_pass_ms_per_image": 1e3 * float(np.mean(one)),
            "separate_ms_per_image": 1e3 * float(np.mean(sep)), "time_ratio": float(np.sum(one) / np.sum(sep))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--derived", required=True, help="a derived-dataset directory (eco-ray derive)")
    p.add_argument("--images", type=int, default=64, help="validation images timed for (a) (default 64)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--betas", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.4])
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    ds = DerivedDataset.open(args.derived)
    m = ds.manifest
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, _ = load_parent(resolve_model_dir(m["parent"]["uri"], args.tracking_uri or default_tracking_uri("runs")))
    val = CocoPanopticDataset.from_root(m["data"]["root"], "val")
    cfg = m["config"]
    a = derive_ratio(model, val, min(args.images, len(val)), args.batch, cfg["threshold"], cfg["mask_threshold"])

    fits = []
    for beta in args.betas:  # one classification-gate fit + exact evaluation per beta
        r = fit_and_evaluate(ds, GateConfig(kind="classify", beta=beta), [beta])
        fits.append(r.fit_seconds + r.eval_seconds)
    quality = fit_and_evaluate(ds, GateConfig(kind="quality"), args.betas)
    n_train = len(ds.split("train"))
    parent_pass_s = a["one_pass_ms_per_image"] / 1e3 * n_train
    beta_change_s = statistics.median(fits)
    result = {
        "benchmark": "derive_gate", "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "threads": torch.get_num_threads(), "model": model.config.name, "derived": str(args.derived),
        "parent": m["parent"], "derive": a,
        "beta_change": {"classify_fit_plus_eval_s_median": beta_change_s, "betas": args.betas,
                        "quality_fit_once_plus_eval_all_betas_s": quality.fit_seconds + quality.eval_seconds,
                        "train_images": n_train, "parent_pass_over_train_s": parent_pass_s,
                        "ratio": parent_pass_s / beta_change_s},
        "recorded_derive_timings": m.get("timings"),
    }
    if args.json:
        print(json.dumps(result, indent=2, default=float))
        return
    print(f"{result['model']} parent {m['parent'].get('uri')}, {result['machine']}, {result['threads']} threads")
    print(f"(a) derive, {a['images']} val images, batch {a['batch']}, incl. post-processing + statistics:")
    print(f"    one multi-exit pass  {a['one_pass_ms_per_image']:8.2f} ms/image")
    print(f"    {len(model.exits)} separate forwards  {a['separate_ms_per_image']:8.2f} ms/image   "
          f"ratio {a['time_ratio']:.3f}")
    b = result["beta_change"]
    print(f"(b) change beta: classification gate fit + exact evaluation {b['classify_fit_plus_eval_s_median']:.3f} s "
          f"(median of {len(args.betas)}); quality gate once for all {len(args.betas)} betas "
          f"{b['quality_fit_once_plus_eval_all_betas_s']:.3f} s")
    print(f"    one parent pass over the {n_train} training images: {parent_pass_s:.1f} s  ->  "
          f"{b['ratio']:.0f}x cheaper (target >= 100x)")


if __name__ == "__main__":
    main()
