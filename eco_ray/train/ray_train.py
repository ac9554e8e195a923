"""Step A on Ray Train: data-parallel early-exit training, checkpointed, resumable, tracked in MLflow.

Driver: checks the config and data before Ray starts, opens (or reopens) the MLflow run, runs a
``TorchTrainer`` and, at the end, writes the parent (safetensors + config), a plot of PQ per exit, and
registers the parent in the MLflow Model Registry.

Workers: the loop of eco_ray/train/loop.py under DDP (gloo on CPU, NCCL on GPU). Checkpoints (weights,
optimiser, step) go through ``ray.train.report`` every ``checkpoint_every`` steps; after a worker dies
Ray Train restarts the group and every worker resumes from the last checkpoint. A stopped driver resumes
with ``eco-ray train --resume NAME``: the same Ray Train run name and storage find the same checkpoints,
and the same MLflow run continues.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from eco_ray.cluster import init_ray
from eco_ray.config import ConfigError
from eco_ray.train.config import TrainConfig

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_STATE = "state.json"


class TrainRunError(RuntimeError):
    pass


def dataset_hash(root: str | Path) -> str:
    """Hash of the annotation files of both splits (not of the pixels: fast on large datasets too)."""
    from eco_ray.registry import content_hash

    root = Path(root)
    return content_hash({s: hashlib.sha256((root / "annotations" / f"panoptic_{s}.json").read_bytes()).hexdigest()
                         for s in ("train", "val")})


def check_inputs(cfg: TrainConfig) -> dict:
    """Everything that can be checked before Ray starts; returns the dataset facts the run needs."""
    from eco_ray.data import CocoPanopticDataset, DatasetError

    try:
        train = CocoPanopticDataset.from_root(cfg.data_root, "train")
        val = CocoPanopticDataset.from_root(cfg.data_root, "val")
    except DatasetError as e:
        raise ConfigError(f"data_root={cfg.data_root!r}: {e}") from None
    per_worker = cfg.batch_size // cfg.num_workers
    if len(train) // cfg.num_workers < per_worker:
        raise ConfigError(f"data_root={cfg.data_root!r} has {len(train)} training images: too few for "
                          f"{cfg.num_workers} workers with batch {per_worker} each")
    if len(val) == 0:
        raise ConfigError(f"data_root={cfg.data_root!r} has no validation images")
    if cfg.model.pretrained and not (Path(cfg.model.pretrained) / "config.json").is_file():
        raise ConfigError(f"model.pretrained={cfg.model.pretrained!r} is not a local transformers model directory "
                          f"(no config.json); nothing is downloaded")
    return {"num_labels": len(train.categories), "categories": train.categories.to_coco(),
            "train_images": len(train), "val_images": len(val), "data_hash": dataset_hash(cfg.data_root)}


# ------------------------------------------------------------------------------------------------ worker
def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from safetensors.torch import load_model, save_model

    from eco_ray.config import load_config
    from eco_ray.data import CocoPanopticDataset
    from eco_ray.model.io import build_parent
    from eco_ray.train.loop import ExitSchedule, lr_factor, make_optimizer, train_step, training_batches, validate

    cfg = load_config(TrainConfig, layers=[config["train_config"]])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    train_ds = CocoPanopticDataset.from_root(cfg.data_root, "train")
    val_ds = CocoPanopticDataset.from_root(cfg.data_root, "val")
    core = build_parent(cfg.model)
    optimizer_state, start_step = None, 0
    checkpoint = _resume_checkpoint(ray.train.get_checkpoint(), config["storage_run_path"], config["run_id"])
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_model(core, os.path.join(d, CHECKPOINT_WEIGHTS))
            optimizer_state = torch.load(os.path.join(d, CHECKPOINT_OPTIMIZER), weights_only=True)
            start_step = json.loads(Path(d, CHECKPOINT_STATE).read_text())["step"]
        if rank == 0:
            _say(f"[train] resuming from the checkpoint at step {start_step}")
    device = ray.train.torch.get_device()
    schedule = ExitSchedule(core.exits, cfg.exit_sampling, cfg.alpha, cfg.seed)
    # a step that stops at a shallow exit leaves the deeper layers without a gradient, which DDP must be told;
    # so do encoder layers past the last exit, which no step reaches
    find_unused = not (schedule.every_step_reaches_the_deepest_exit and core.exits[-1] == cfg.model.encoder_layers)
    model = ray.train.torch.prepare_model(core, parallel_strategy_kwargs={"find_unused_parameters": find_unused})
    core = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(core, cfg.lr, cfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    batches = training_batches(train_ds, cfg.batch_size // world, cfg.model.image_size, cfg.seed, rank, world,
                               start_step)
    client = MlflowClient(config["tracking_uri"]) if rank == 0 else None
    pending: list = []
    t0, last_print = time.perf_counter(), 0.0
    if rank == 0 and start_step > 0:
        client.log_metric(config["run_id"], "resumed_from_step", start_step, step=start_step)
    for step in range(start_step, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.steps)
        core.train()
        metrics = train_step(model, core, optimizer, next(batches), schedule.exits_for_step(step), schedule,
                             cfg.grad_clip, device, autocast=cfg.mixed_precision and device.type == "cuda")
        done = step + 1
        if rank == 0:
            now = int(time.time() * 1000)
            pending += [Metric(k, v, now, done) for k, v in metrics.items()]
            pending.append(Metric("lr", optimizer.param_groups[0]["lr"], now, done))
            elapsed = time.perf_counter() - t0
            if elapsed - last_print >= 5 or done == cfg.steps:
                rate = (done - start_step) / elapsed
                eta = (cfg.steps - done) / max(rate, 1e-9)
                _say(f"[train] step {done}/{cfg.steps}  loss {metrics['loss']:.3f}  {rate:.2f} steps/s  "
                     f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
                last_print = elapsed
        is_eval = done % cfg.eval_every == 0 or done == cfg.steps
        if done % cfg.checkpoint_every == 0 or is_eval:
            report = {"step": done, **metrics}
            if rank == 0 and is_eval:
                val = validate(core, val_ds, cfg.eval_images)
                report.update(val)
                pending += [Metric(k, v, int(time.time() * 1000), done) for k, v in val.items()]
                _say("[train] validation at step %d: PQ per exit %s" % (done, ", ".join(
                    f"{k}: {val[f'val_pq_exit{k}']:.3f}" for k in core.exits)))
            if rank == 0 and pending:
                for i in range(0, len(pending), 900):  # the MLflow batch limit is 1000 metrics
                    client.log_batch(config["run_id"], metrics=pending[i:i + 900])
                pending = []
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    save_model(core, os.path.join(d, CHECKPOINT_WEIGHTS))
                    torch.save(optimizer.state_dict(), os.path.join(d, CHECKPOINT_OPTIMIZER))
                    Path(d, CHECKPOINT_STATE).write_text(json.dumps({"step": done, "run_id": config["run_id"]}))
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report(report, checkpoint=ckpt)


def _say(line: str) -> None:
    """A progress line from a Train worker, printed once: Ray Train's patched print() tees a line printed to a
    redirected sys.stdout AND logs it, so the driver showed every line twice; an explicit file is printed as is."""
    print(line, file=sys.__stdout__, flush=True)


def _checkpoint_step(checkpoint) -> int:
    fs, path = checkpoint.filesystem, checkpoint.path
    with fs.open_input_stream(f"{path}/{CHECKPOINT_STATE}") as f:
        return int(json.loads(f.read().decode())["step"])


def _resume_checkpoint(registered, storage_run_path: str, run_id: str):
    """The checkpoint to resume from: the latest of the one Ray Train registered and the complete ones in
    the run's storage. Ray Train registers a reported checkpoint only when its controller next polls the
    workers, so a worker killed right after a report can leave a newer checkpoint on storage than the
    registered one (or none registered at all); taking it loses less work and never restarts from 0
    while a checkpoint of this run exists."""
    import pyarrow.fs as pafs
    import ray.train

    best, best_step = registered, (_checkpoint_step(registered) if registered is not None else 0)
    try:
        fs, root = pafs.FileSystem.from_uri(storage_run_path)
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (OSError, ValueError):
        return best
    for entry in entries:
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        files = {f.base_name for f in fs.get_file_info(pafs.FileSelector(entry.path))}
        if not {CHECKPOINT_WEIGHTS, CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE} <= files:
            continue  # incomplete: its upload was interrupted
        try:
            with fs.open_input_stream(f"{entry.path}/{CHECKPOINT_STATE}") as f:
                state = json.loads(f.read().decode())
        except (OSError, ValueError):
            continue
        if state.get("run_id") == run_id and int(state["step"]) > best_step:
            best, best_step = ray.train.Checkpoint(entry.path, filesystem=fs), int(state["step"])
    return best


# ------------------------------------------------------------------------------------------------ driver
def _absolute(path: str) -> str:
    """Workers run in other directories (and on other nodes): they get absolute paths (URIs stay)."""
    return path if "://" in path else str(Path(path).resolve())


def new_run_name() -> str:
    return "train-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def run_training(cfg: TrainConfig | None = None, *, name: str | None = None, resume: str | None = None,
                 address: str | None = None, tracking_uri: str | None = None, run_dir: str | None = None) -> dict:
    """Train (or resume) a parent; returns a summary with the run name, MLflow run id, model version."""
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from eco_ray.config import load_config, to_yaml
    from eco_ray.registry import content_hash, default_tracking_uri, ensure_experiment, flat_params

    if resume:
        base = Path(run_dir or (cfg.run_dir if cfg else "runs")) / "train" / resume
        if not (base / "run.json").is_file():
            raise ConfigError(f"cannot resume {resume!r}: {base / 'run.json'} not found")
        info = json.loads((base / "run.json").read_text())
        cfg = load_config(TrainConfig, base / "config.yaml")
        cfg.data_root, cfg.run_dir = _absolute(cfg.data_root), _absolute(cfg.run_dir)
        name, tracking_uri = resume, info["tracking_uri"]
    else:
        cfg = cfg or TrainConfig()
        cfg.data_root, cfg.run_dir = _absolute(cfg.data_root), _absolute(cfg.run_dir)
        if cfg.model.pretrained:
            cfg.model.pretrained = _absolute(cfg.model.pretrained)
        name = name or new_run_name()
        base = Path(cfg.run_dir) / "train" / name
        if (base / "run.json").exists():
            raise ConfigError(f"a training run named {name!r} exists already; resume it with --resume {name} "
                              f"or pick another --name")
    facts = check_inputs(cfg)  # before Ray starts
    if cfg.model.num_labels != facts["num_labels"]:
        cfg.model.num_labels = facts["num_labels"]
    tracking_uri = tracking_uri or default_tracking_uri(cfg.run_dir)
    client = MlflowClient(tracking_uri)
    if resume:
        run_id = info["run_id"]
        client.set_tag(run_id, "resumed_at", datetime.now(timezone.utc).isoformat())
    else:
        base.mkdir(parents=True, exist_ok=True)
        (base / "config.yaml").write_text(to_yaml(cfg))
        experiment_id = ensure_experiment(cfg.experiment, cfg.run_dir, tracking_uri)
        run = client.create_run(experiment_id, run_name=name, tags={
            "eco_ray.stage": "train", "data_hash": facts["data_hash"], "config_hash": content_hash(asdict(cfg))})
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in flat_params(asdict(cfg)).items()])
        info = {"name": name, "run_id": run_id, "tracking_uri": tracking_uri, "data_hash": facts["data_hash"]}
        (base / "run.json").write_text(json.dumps(info, indent=2))

    storage = cfg.storage_path or str((Path(cfg.run_dir) / "ray").resolve())
    storage_run_path = f"{storage.rstrip('/')}/{name}"
    init_ray(address, log_to_driver=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train_config": asdict(cfg), "run_id": run_id, "tracking_uri": tracking_uri,
                           "storage_run_path": storage_run_path},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:
        client.set_tag(run_id, "status", "failed")
        raise TrainRunError(f"training run {name} failed: {e}. Fix the cause and continue it with "
                            f"`eco-ray train --resume {name}` (progress up to the last checkpoint is kept).") from e
    seconds = time.perf_counter() - t0
    return _finish(cfg, name, base, run_id, tracking_uri, facts, result, seconds)


def _finish(cfg: TrainConfig, name: str, base: Path, run_id: str, tracking_uri: str, facts: dict, result,
            seconds: float) -> dict:
    """Final weights + config, the PQ-per-exit plot, artifacts and the registered model version."""
    from mlflow import MlflowClient
    from safetensors.torch import load_model

    from eco_ray.model.io import build_parent, save_parent
    from eco_ray.registry import content_hash, register_directory

    client = MlflowClient(tracking_uri)
    model = build_parent(cfg.model)
    with result.checkpoint.as_directory() as d:
        load_model(model, os.path.join(d, CHECKPOINT_WEIGHTS))
        state = json.loads(Path(d, CHECKPOINT_STATE).read_text())
    parent_dir = save_parent(model, base / "parent", extra={
        "categories": facts["categories"], "data_hash": facts["data_hash"], "train_run": name, "steps": state["step"]})
    metrics = result.metrics or {}
    pq = {k: metrics.get(f"val_pq_exit{k}") for k in model.exits}
    plot = _plot_pq_per_exit(metrics, model.exits, base / "pq_per_exit.png", name)
    client.log_artifacts(run_id, str(parent_dir), "parent")
    if plot:
        client.log_artifact(run_id, str(plot))
    client.log_metric(run_id, "train_seconds", seconds)
    version = register_directory(client, cfg.registered_model, run_id, "parent", tags={
        "data_hash": facts["data_hash"], "config_hash": content_hash(asdict(cfg)), "train_run": name,
        "steps": state["step"], **{f"val_pq_exit{k}": f"{v:.4f}" for k, v in pq.items() if v is not None}},
        description="eco-ray early-exit Mask2Former parents (Step A)")
    client.set_terminated(run_id)
    summary = {"name": name, "run_id": run_id, "tracking_uri": tracking_uri, "steps": state["step"],
               "seconds": round(seconds, 1), "parent_dir": str(parent_dir), "registered_model": cfg.registered_model,
               "version": version, "model_uri": f"models:/{cfg.registered_model}/{version}", "val_pq_per_exit": pq,
               "val_pq_things_per_exit": {k: metrics.get(f"val_pq_things_exit{k}") for k in model.exits},
               "val_pq_stuff_per_exit": {k: metrics.get(f"val_pq_stuff_exit{k}") for k in model.exits}}
    (base / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _plot_pq_per_exit(metrics: dict, exits: list[int], path: Path, title: str) -> Path | None:
    if f"val_pq_exit{exits[-1]}" not in metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("val_pq", "PQ"), ("val_pq_things", "PQ things"), ("val_pq_stuff", "PQ stuff")):
        ax.plot(exits, [metrics[f"{key}_exit{k}"] for k in exits], marker="o", label=label)
    ax.set_xlabel("exit (encoder layers run)")
    ax.set_ylabel("validation PQ")
    ax.set_xticks(exits)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{title}: PQ per exit")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

