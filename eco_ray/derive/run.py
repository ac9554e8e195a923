"""Step B on Ray: the parent at every exit on every image, as a reusable, versioned derived dataset.

Driver: resolves the parent (MLflow URI or directory) and its task, checks the dataset, computes the cache
key (parent weights hash + annotation hashes + settings) and reuses an existing derived dataset with the
same key. Otherwise it ships the parent's safetensors bytes through the object store and runs one Ray
task per chunk of images (one multi-exit forward per image and view: backbone and encoder once, every
exit tapped; what is kept of it is the task's: panoptic statistics or detection matching records); a task
lost with its worker is retried by Ray. Then it measures the exit cost table on
this machine, writes the split files and the manifest (see eco_ray/derive/table.py), and logs the
dataset, its noise floor and plots to MLflow.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path


from eco_ray.cluster import init_ray
from eco_ray.config import ConfigError, content_hash
from eco_ray.context import RunContext
from eco_ray.derive.config import DeriveConfig
from eco_ray.tracking import Stage, Tag, parent_links
from eco_ray.derive.table import MANIFEST, DerivedDataset, write_manifest, write_split


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _derive_chunk(blob_ref, root: str, split: str, indices: list[int], cfg: DeriveConfig, gate_input: str) -> dict:
    """One Ray task: every exit of every view of ``indices``; plain arrays back to the driver."""
    import ray
    import torch

    from eco_ray.tasks import get_task

    torch.set_num_threads(1)
    model = _cached_parent(blob_ref)
    on_gpu = torch.cuda.is_available() and bool(ray.get_gpu_ids())  # a task given gpus_per_task
    model.to("cuda" if on_gpu else "cpu")
    model.config.gate_input = gate_input  # the effective one, resolved by run_derive (workers cache the model)
    task = get_task(blob_ref["meta"].get("task", "panoptic"))
    return task.derive_part(model, task.open_dataset(root, split), indices, cfg.views, cfg, autocast=on_gpu)


def _ray_map(cfg: DeriveConfig):
    """Run ``fn(*args)`` for each item as a Ray task (retried when lost with its worker); results in order."""
    import ray

    def map_blocks(fn, items):
        remote = ray.remote(num_cpus=cfg.cpus_per_task, max_retries=3)(fn)
        return ray.get([remote.remote(*args) for args in items])

    return map_blocks


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


def run_derive(cfg: DeriveConfig, *, parent: str, data_root: str | Path, ctx: RunContext, out: str | Path | None = None,
               overwrite: bool = False) -> dict:
    """Derive (or reuse) the table of ``parent`` (a models:/ or runs:/ URI, or a directory) on the dataset at
    ``data_root`` (COCO panoptic for a segmenter, COCO instances for a detector: the parent's task), into
    ``out`` (default ``<run_dir>/derived/<key>``); returns the manifest plus ``{"path", "reused"}``."""
    import ray

    from eco_ray.data import DatasetError
    from eco_ray.model.io import ModelFileError, parent_from_blob, read_parent_blob
    from eco_ray.tasks import get_task
    from eco_ray.tracking import describe_model_uri, resolve_model_dir

    cfg.validate()
    data_root = str(data_root)
    # everything that can fail does so before Ray starts
    parent_info = describe_model_uri(parent, ctx.tracking_uri)
    parent_dir = resolve_model_dir(parent, ctx.tracking_uri)
    try:
        blob = read_parent_blob(parent_dir, task=None)
        task = get_task(blob["meta"].get("task", "panoptic"))
    except (ModelFileError, ValueError) as e:
        raise ConfigError(f"--parent {parent}: {e}") from None
    datasets = {}
    for split in cfg.splits:
        try:
            datasets[split] = task.open_dataset(data_root, split)
        except DatasetError as e:
            raise ConfigError(f"data_root={data_root!r}, split {split!r}: {e}") from None
    parent_info["weights_sha256"] = hashlib.sha256(blob["weights"]).hexdigest()
    categories = task.categories(datasets[cfg.splits[0]])
    gate_input = cfg.gate_input or blob["meta"]["model"].get("gate_input", "stride32")
    model_categories = blob["meta"].get("categories")
    ids = [int(c["id"]) for c in categories]
    if model_categories and [int(c["id"]) for c in model_categories] != ids:
        raise ConfigError(f"the parent was trained on categories {[int(c['id']) for c in model_categories]}, but "
                          f"{data_root} has {ids}")
    data_info = {"root": str(Path(data_root).resolve()),
                 "annotations_sha256": {s: _sha(task.annotation_file(data_root, s)) for s in datasets}}
    settings = {"splits": cfg.splits, "views": cfg.views, "max_images": cfg.max_images}
    if task.name == "panoptic":  # the thresholds of panoptic post-processing (a panoptic key is as it was)
        settings.update(threshold=cfg.threshold, mask_threshold=cfg.mask_threshold,
                        overlap_threshold=cfg.overlap_threshold)
    else:
        settings.update(task=task.name, label_block=cfg.label_block)
    key = content_hash({"parent": parent_info["weights_sha256"], "data": data_info["annotations_sha256"],
                        **settings, **({"gate_input": cfg.gate_input} if cfg.gate_input else {})})
    out = Path(out) if out else ctx.derived_dir(key)
    if ctx.run_dir.resolve().is_relative_to(out.resolve()):
        # the table's files are logged to MLflow from `out`: an artifact store inside it would copy itself
        raise ConfigError(f"--out {out} holds the run directory {ctx.run_dir}, whose MLflow artifacts the table is "
                          f"logged to: pick an --out inside the run directory or outside it")
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

    init_ray(ctx.address, log_to_driver=True)
    remote = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task, max_retries=3)(_derive_chunk)
    blob_ref = ray.put(blob)
    root = str(Path(data_root).resolve())
    t_start = time.perf_counter()
    splits, timings = {}, {}
    for split, ds in datasets.items():
        n = len(ds) if cfg.max_images == 0 else min(cfg.max_images, len(ds))
        chunks = [list(range(i, min(i + cfg.chunk_size, n))) for i in range(0, n, cfg.chunk_size)]
        t0 = time.perf_counter()
        pending = {remote.remote(blob_ref, root, split, c, cfg, gate_input): len(c) for c in chunks}
        parts, done = [], 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                parts.append(ray.get(ref))
                done += pending.pop(ref)
            _progress(split, done, n, t0)
        timings[split] = {"images": n, "seconds": round(time.perf_counter() - t0, 2)}
        splits[split] = task.assemble_split(split, parts, cfg.views, cfg, map_blocks=_ray_map(cfg))
        write_split(out, splits[split])
    derive_seconds = time.perf_counter() - t_start

    from eco_ray.model.cost import exit_cost_table

    model = parent_from_blob(blob)
    costs = exit_cost_table(model, repeats=cfg.latency_repeats, measure_latency=cfg.measure_latency)
    manifest = {
        "key": key, "task": task.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parent": parent_info,
        "data": data_info, "config": asdict(cfg), "exits": model.exits, "views": cfg.views,
        "categories": categories, "gate_input": gate_input,
        "gate_input_dim": int(next(iter(splits.values())).gate_features.shape[1]), "costs": costs,
        "splits": {s: task.split_summary(d, categories, cfg.sufficient_tolerance) for s, d in splits.items()},
        "timings": {**timings, "total_seconds": round(derive_seconds, 2), "cpus": ray.cluster_resources().get("CPU")},
    }
    tracker = ctx.tracker()
    manifest["mlflow_run_id"] = tracker.start_run(Stage.DERIVE, f"derive-{key}", {
        Tag.DERIVED_KEY: key, **parent_links(parent_info), Tag.DERIVED_PATH: str(out.resolve())}, asdict(cfg))
    write_manifest(out, manifest)  # last: a directory with a manifest is complete
    _log_to_mlflow(tracker, out, manifest, task)
    return {**DerivedDataset.open(out).manifest, "path": str(out), "reused": False}


def _log_to_mlflow(tracker, out: Path, manifest: dict, task) -> None:
    from eco_ray.plots import plot_derived

    run_id = manifest["mlflow_run_id"]
    metrics = {"derive_seconds": manifest["timings"]["total_seconds"]}
    for split, s in manifest["splits"].items():
        nf = s["noise_floor"]
        if "mean_abs_diff" in nf:
            metrics.update({f"{split}_noise_mean_abs_diff": nf["mean_abs_diff"],
                            f"{split}_noise_share_above_tol": nf["share_above_tolerance"]})
        for k, r in s["static"].items():
            metrics.update({f"{split}_{name}_exit{k}": r[name] for name, _ in task.validation_series})
    tracker.log_metrics(run_id, metrics)
    tracker.log_artifacts(run_id, out, "derived")
    with tempfile.TemporaryDirectory() as d:
        tracker.log_artifact(run_id, plot_derived(manifest, Path(d) / "derived.png"))
    tracker.end_run(run_id)
