"""Step B on Ray: the parent at every exit on every image, as a reusable, versioned Parquet dataset.

Driver: resolves the parent (MLflow URI or directory), checks the dataset, computes the cache key
(parent weights hash + annotation hashes + settings) and reuses an existing derived dataset with the
same key. Otherwise it ships the parent's safetensors bytes through the object store and runs one Ray
task per chunk of images (one multi-exit forward per image and view: backbone and encoder once, every
exit tapped); a task lost with its worker is retried by Ray. Then it measures the exit cost table on
this machine, writes ``<split>.parquet`` and the manifest (see eco_ray/derive/table.py), and logs the
dataset, its noise floor and plots to MLflow.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from eco_ray.cluster import init_ray
from eco_ray.config import ConfigError
from eco_ray.derive.table import (MANIFEST, VIEWS, DerivedDataset, DerivedSplit, noise_floor, write_manifest,
                                  write_split)
from eco_ray.model.config import GATE_INPUTS
from eco_ray.model.postprocess import OVERLAP_THRESHOLD


@dataclass
class DeriveConfig:
    parent: str = "models:/eco-parent/latest"  # models:/name@alias, models:/name/version, runs:/id/parent or a directory
    data_root: str = "runs/data"
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    views: list[str] = field(default_factory=lambda: list(VIEWS))  # view 0 must be "plain"
    max_images: int = 0  # per split; 0 = all
    chunk_size: int = 64  # images per Ray task
    batch_size: int = 16  # images per forward inside a task
    cpus_per_task: float = 1.0
    threshold: float = 0.5  # panoptic post-processing: query score threshold
    mask_threshold: float = 0.5
    overlap_threshold: float = OVERLAP_THRESHOLD  # a query keeps a segment only if it wins this share of its mask
    measure_latency: bool = True  # time every exit on this machine (else GFLOPs only)
    latency_repeats: int = 20
    gate_input: str | None = None  # stride32 | levels; default: the parent's (ModelConfig.gate_input)
    sufficient_tolerance: float = 0.02  # per-image PQ within this of the deepest exit counts as sufficient
    out: str | None = None  # default <run_dir>/derived/<key>
    run_dir: str = "runs"
    experiment: str = "eco-ray"

    def validate(self) -> None:
        if not self.splits:
            raise ValueError("splits must name at least one split")
        if not self.views or self.views[0] != "plain" or set(self.views) - set(VIEWS) or \
                len(set(self.views)) != len(self.views):
            raise ValueError(f"views must start with 'plain' and use each of {list(VIEWS)} at most once, "
                             f"got {self.views}")
        for name in ("chunk_size", "batch_size", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_images < 0 or self.cpus_per_task <= 0:
            raise ValueError("max_images must be >= 0 and cpus_per_task > 0")
        if self.gate_input is not None and self.gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {self.gate_input!r}")
        if not all(0 <= t <= 1 for t in (self.threshold, self.mask_threshold, self.overlap_threshold)):
            raise ValueError("threshold, mask_threshold and overlap_threshold must lie in [0, 1]")


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _derive_chunk(blob_ref, root: str, split: str, indices: list[int], views: list[str], batch_size: int,
                  threshold: float, mask_threshold: float, overlap_threshold: float, gate_input: str) -> dict:
    """One Ray task: every exit of every view of ``indices``; plain arrays back to the driver."""
    import torch

    from eco_ray.data import CocoPanopticDataset
    from eco_ray.evaluate import evaluate_exits
    from eco_ray.metrics.panoptic import PanopticStats

    torch.set_num_threads(1)
    model = _cached_parent(blob_ref)
    model.config.gate_input = gate_input  # the effective one, resolved by run_derive (workers cache the model)
    ds = CocoPanopticDataset.from_root(root, split)
    per_view = [evaluate_exits(model, ds, indices=indices, batch_size=batch_size, flip=(v == "flip"),
                               threshold=threshold, mask_threshold=mask_threshold,
                               overlap_threshold=overlap_threshold) for v in views]
    stats = PanopticStats(**{k: np.stack([getattr(ev.stats, k) for ev in per_view], axis=1)
                             for k in per_view[0].stats.as_dict()})
    plain = per_view[0]
    return {"image_ids": plain.image_ids, "exits": plain.exits, "stats": stats.as_dict(), "gate_features": plain.gate_features,
            "kinds": [m.get("eco_kind", "") for m in plain.meta],
            "num_objects": [int(m.get("eco_num_objects", -1)) for m in plain.meta]}


_PARENT_CACHE: dict = {}


def _cached_parent(blob):
    """Workers are reused across tasks: build the parent once per worker process."""
    from eco_ray.model.io import parent_from_blob

    key = hashlib.sha256(blob["weights"]).hexdigest()
    if key not in _PARENT_CACHE:
        _PARENT_CACHE.clear()
        _PARENT_CACHE[key] = parent_from_blob(blob)
    return _PARENT_CACHE[key]


def _progress(split: str, done: int, total: int, t0: float) -> None:
    rate = done / max(time.perf_counter() - t0, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    print(f"[derive] {split}: {done}/{total} images  {rate:.1f} images/s  ETA {int(eta // 60)}m{int(eta % 60):02d}s",
          file=sys.stderr, flush=True)


def run_derive(cfg: DeriveConfig, *, tracking_uri: str | None = None, address: str | None = None,
               overwrite: bool = False) -> dict:
    """Derive (or reuse) the table; returns the manifest plus ``{"path", "reused"}``."""
    import ray

    from eco_ray.data import CocoPanopticDataset, DatasetError
    from eco_ray.metrics.panoptic import CategorySet
    from eco_ray.model.io import parent_from_blob, read_parent_blob
    from eco_ray.registry import content_hash, default_tracking_uri, describe_model_uri, resolve_model_dir

    cfg.validate()
    tracking_uri = tracking_uri or default_tracking_uri(cfg.run_dir)
    # everything that can fail does so before Ray starts
    datasets = {}
    for split in cfg.splits:
        try:
            datasets[split] = CocoPanopticDataset.from_root(cfg.data_root, split)
        except DatasetError as e:
            raise ConfigError(f"data_root={cfg.data_root!r}, split {split!r}: {e}") from None
    parent_info = describe_model_uri(cfg.parent, tracking_uri)
    parent_dir = resolve_model_dir(cfg.parent, tracking_uri)
    blob = read_parent_blob(parent_dir)
    parent_info["weights_sha256"] = hashlib.sha256(blob["weights"]).hexdigest()
    categories = CategorySet(datasets[cfg.splits[0]].categories.to_coco())
    gate_input = cfg.gate_input or blob["meta"]["model"].get("gate_input", "stride32")
    model_categories = blob["meta"].get("categories")
    if model_categories and list(CategorySet(model_categories).ids) != list(categories.ids):
        raise ConfigError(f"the parent was trained on categories {list(CategorySet(model_categories).ids)}, but "
                          f"{cfg.data_root} has {list(categories.ids)}")
    data_info = {"root": str(Path(cfg.data_root).resolve()),
                 "annotations_sha256": {s: _sha(ds.paths.annotations_json) for s, ds in datasets.items()}}
    key = content_hash({"parent": parent_info["weights_sha256"], "data": data_info["annotations_sha256"],
                        "splits": cfg.splits, "views": cfg.views, "max_images": cfg.max_images,
                        "threshold": cfg.threshold, "mask_threshold": cfg.mask_threshold,
                        "overlap_threshold": cfg.overlap_threshold,
                        **({"gate_input": cfg.gate_input} if cfg.gate_input else {})})
    out = Path(cfg.out or Path(cfg.run_dir) / "derived" / key)
    if (out / MANIFEST).is_file():
        existing = DerivedDataset.open(out).manifest
        if existing.get("key") == key and not overwrite:
            print(f"[derive] {out} already holds this derived dataset (key {key}): reusing it", file=sys.stderr)
            return {**existing, "path": str(out), "reused": True}
        if existing.get("key") != key and not overwrite:
            raise ConfigError(f"{out} holds a derived dataset of other inputs (key {existing.get('key')}, these "
                              f"are {key}); pass --overwrite or another --out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    init_ray(address, log_to_driver=True)
    task = ray.remote(num_cpus=cfg.cpus_per_task, max_retries=3)(_derive_chunk)
    blob_ref = ray.put(blob)
    root = str(Path(cfg.data_root).resolve())
    t_start = time.perf_counter()
    splits, timings = {}, {}
    for split, ds in datasets.items():
        n = len(ds) if cfg.max_images == 0 else min(cfg.max_images, len(ds))
        chunks = [list(range(i, min(i + cfg.chunk_size, n))) for i in range(0, n, cfg.chunk_size)]
        t0 = time.perf_counter()
        pending = {task.remote(blob_ref, root, split, c, cfg.views, cfg.batch_size, cfg.threshold,
                               cfg.mask_threshold, cfg.overlap_threshold, gate_input): len(c) for c in chunks}
        parts, done = [], 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                parts.append(ray.get(ref))
                done += pending.pop(ref)
            _progress(split, done, n, t0)
        timings[split] = {"images": n, "seconds": round(time.perf_counter() - t0, 2)}
        splits[split] = _assemble(split, parts, cfg.views)
        write_split(out, splits[split])
    derive_seconds = time.perf_counter() - t_start

    from eco_ray.model.cost import exit_cost_table

    model = parent_from_blob(blob)
    costs = exit_cost_table(model, repeats=cfg.latency_repeats, measure_latency=cfg.measure_latency)
    manifest = {
        "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parent": parent_info,
        "data": data_info, "config": asdict(cfg), "exits": model.exits, "views": cfg.views,
        "categories": categories.to_coco(), "gate_input": gate_input, "gate_input_dim": int(next(iter(splits.values())).gate_features.shape[1]),
        "costs": costs, "splits": {s: _split_summary(d, categories, cfg.sufficient_tolerance) for s, d in splits.items()},
        "timings": {**timings, "total_seconds": round(derive_seconds, 2), "cpus": ray.cluster_resources().get("CPU")},
    }
    manifest["mlflow_run_id"] = _start_mlflow_run(out, manifest, cfg, tracking_uri)
    write_manifest(out, manifest)  # last: a directory with a manifest is complete
    _log_to_mlflow(out, manifest, cfg, tracking_uri)
    return {**DerivedDataset.open(out).manifest, "path": str(out), "reused": False}


def _assemble(split: str, parts: list[dict], views: list[str]) -> DerivedSplit:
    from eco_ray.metrics.panoptic import PanopticStats

    ids = np.concatenate([p["image_ids"] for p in parts])
    order = np.argsort(ids, kind="stable")
    stats = PanopticStats(**{k: np.concatenate([p["stats"][k] for p in parts])[order] for k in parts[0]["stats"]})
    return DerivedSplit(split, ids[order].astype(np.int64), list(parts[0]["exits"]), views, stats,
                        np.concatenate([p["gate_features"] for p in parts])[order].astype(np.float32),
                        np.asarray(sum((p["kinds"] for p in parts), []), dtype=object)[order],
                        np.asarray(sum((p["num_objects"] for p in parts), []), dtype=np.int64)[order])


def _split_summary(split: DerivedSplit, categories, tolerance: float) -> dict:
    """Per split: static PQ per exit (plain view), the noise floor, the shallowest sufficient exit."""
    from eco_ray.metrics.panoptic import aggregate
    from eco_ray.tradeoff import shallowest_sufficient

    static = {int(k): aggregate(split.eval_stats[:, e], categories).summary() for e, k in enumerate(split.exits)}
    suff = shallowest_sufficient(split.quality, tolerance)
    hist = {int(k): int((suff == e).sum()) for e, k in enumerate(split.exits)}
    by_kind = {}
    for kind in sorted(set(split.kinds.tolist()) - {""}):
        sel = split.kinds == kind
        by_kind[kind] = {int(k): int((suff[sel] == e).sum()) for e, k in enumerate(split.exits)}
    return {"images": len(split), "static": static, "noise_floor": noise_floor(split, tolerance),
            "sufficient_exit_histogram": hist, "sufficient_exit_histogram_by_kind": by_kind,
            "quality_mean_per_exit": {int(k): float(split.quality[:, e].mean()) for e, k in enumerate(split.exits)}}


def _start_mlflow_run(out: Path, manifest: dict, cfg: DeriveConfig, tracking_uri: str) -> str:
    from mlflow import MlflowClient

    from eco_ray.registry import ensure_experiment

    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(cfg.experiment, cfg.run_dir, tracking_uri)
    parent = manifest["parent"]
    run = client.create_run(experiment_id, run_name=f"derive-{manifest['key']}", tags={
        "eco_ray.stage": "derive", "derived_key": manifest["key"], "parent_uri": parent["uri"],
        "parent_version": parent.get("version", ""), "parent_run_id": parent.get("run_id", ""),
        "derived_path": str(out.resolve())})
    return run.info.run_id


def _log_to_mlflow(out: Path, manifest: dict, cfg: DeriveConfig, tracking_uri: str) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from eco_ray.registry import flat_params

    client = MlflowClient(tracking_uri)
    run_id = manifest["mlflow_run_id"]
    now = int(time.time() * 1000)
    metrics = [Metric("derive_seconds", manifest["timings"]["total_seconds"], now, 0)]
    for split, s in manifest["splits"].items():
        nf = s["noise_floor"]
        if "mean_abs_diff" in nf:
            metrics += [Metric(f"{split}_noise_mean_abs_diff", nf["mean_abs_diff"], now, 0),
                        Metric(f"{split}_noise_share_above_tol", nf["share_above_tolerance"], now, 0)]
        for k, r in s["static"].items():
            metrics += [Metric(f"{split}_pq_exit{k}", r["pq"], now, 0),
                        Metric(f"{split}_pq_things_exit{k}", r["pq_things"], now, 0),
                        Metric(f"{split}_pq_stuff_exit{k}", r["pq_stuff"], now, 0)]
    client.log_batch(run_id, metrics=metrics,
                     params=[Param(k, v[:6000]) for k, v in flat_params(asdict(cfg)).items()])
    client.log_artifacts(run_id, str(out), "derived")
    with tempfile.TemporaryDirectory() as d:
        client.log_artifact(run_id, str(plot_derived(manifest, Path(d) / "derived.png")))
    client.set_terminated(run_id)


def plot_derived(manifest: dict, path: Path) -> Path:
    """Static PQ per exit, and the histogram of each image's shallowest sufficient exit, per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exits = manifest["exits"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, s in manifest["splits"].items():
        static = s["static"]
        ax1.plot(exits, [static[k]["pq"] if k in static else static[str(k)]["pq"] for k in exits], marker="o",
                 label=f"{split} PQ")
        hist = s["sufficient_exit_histogram"]
        counts = np.asarray([hist.get(k, hist.get(str(k), 0)) for k in exits], float)
        ax2.plot(exits, counts / max(counts.sum(), 1), marker="s", label=split)
    ax1.set(xlabel="exit (encoder layers run)", ylabel="PQ (plain view)", xticks=exits, title="static depth")
    tol = manifest["config"]["sufficient_tolerance"]
    ax2.set(xlabel="shallowest sufficient exit", ylabel="share of images", xticks=exits,
            title=f"per-image PQ within {tol} of exit {exits[-1]}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
