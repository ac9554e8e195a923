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
from eco_ray.config import ConfigError, content_hash
from eco_ray.context import RunContext
from eco_ray.errors import EcoRayError
from eco_ray.files import write_json as _write_json, write_text
from eco_ray.tasks import get_task
from eco_ray.train.config import TrainConfig, requested, train_config_key, train_config_type

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_STATE = "state.json"


class TrainRunError(EcoRayError):
    """A training run that failed; the message says how to continue it from its last checkpoint."""


def dataset_hash(root: str | Path, task: str = "panoptic") -> str:
    """Hash of the task's annotation files of both splits (not of the pixels: fast on large datasets too)."""
    t = get_task(task)
    return content_hash({s: hashlib.sha256(t.annotation_file(root, s).read_bytes()).hexdigest()
                         for s in ("train", "val")})


def check_inputs(cfg: TrainConfig, data_root: str) -> dict:
    """Everything that can be checked before Ray starts; returns the dataset facts the run needs."""
    from eco_ray.data import DatasetError

    task = get_task(cfg.task)
    try:
        train = task.open_dataset(data_root, "train")
        val = task.open_dataset(data_root, "val")
    except DatasetError as e:
        raise ConfigError(f"data_root={data_root!r}: {e}") from None
    per_worker = cfg.batch_size // cfg.num_workers
    if len(train) // cfg.num_workers < per_worker:
        raise ConfigError(f"data_root={data_root!r} has {len(train)} training images: too few for "
                          f"{cfg.num_workers} workers with batch {per_worker} each")
    if len(val) == 0:
        raise ConfigError(f"data_root={data_root!r} has no validation images")
    if cfg.model.pretrained:
        from eco_ray.model.io import ModelFileError, check_pretrained

        try:
            check_pretrained(cfg.model.pretrained, cfg.task)
        except ModelFileError as e:
            raise ConfigError(f"model.pretrained={cfg.model.pretrained!r}: {e}") from None
    categories = task.categories(train)
    return {"num_labels": len(categories), "categories": categories, "train_images": len(train),
            "val_images": len(val), "data_hash": dataset_hash(data_root, cfg.task)}


# ------------------------------------------------------------------------------------------------ worker
def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import load_model, save_model

    from eco_ray.config import load_config
    from eco_ray.model.io import build_parent
    from eco_ray.tracking import Tracker
    from eco_ray.train.loop import ExitSchedule, lr_factor, make_optimizer, train_step, training_batches, validate

    cfg = load_config(train_config_type(config["train_config"]["task"]), layers=[config["train_config"]])
    task = get_task(cfg.task)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    train_ds = task.open_dataset(config["data_root"], "train")
    val_ds = task.open_dataset(config["data_root"], "val")
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
                               start_step, task=task)
    tracker = Tracker(config["tracking_uri"]) if rank == 0 else None
    pending: list = []  # (key, value, step), sent at each checkpoint
    t0, last_print = time.perf_counter(), 0.0

    def report_checkpoint(done: int, metrics: dict, is_eval: bool, pending: list) -> list:
        """Validate (when due), send the pending metrics, and report a checkpoint of step ``done``."""
        report = {"step": done, **metrics}
        if rank == 0 and is_eval:
            val = validate(core, val_ds, cfg.eval_images, task=task)
            report.update(val)
            pending = pending + [(k, v, done) for k, v in val.items()]
            _say("[train] validation at step %d: %s per exit %s" % (done, task.metric_label, ", ".join(
                f"{k}: {val[f'val_{task.metric}_exit{k}']:.3f}" for k in core.exits)))
        if rank == 0 and pending:
            tracker.log_metrics(config["run_id"], pending)
            pending = []
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                save_model(core, os.path.join(d, CHECKPOINT_WEIGHTS))
                torch.save(optimizer.state_dict(), os.path.join(d, CHECKPOINT_OPTIMIZER))
                Path(d, CHECKPOINT_STATE).write_text(json.dumps({"step": done, "run_id": config["run_id"]}))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(report, checkpoint=ckpt)
        return pending

    if rank == 0 and start_step > 0:
        tracker.log_metrics(config["run_id"], {"resumed_from_step": start_step}, step=start_step)
    for step in range(start_step, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.steps)
        core.train()
        metrics = train_step(model, core, optimizer, next(batches), schedule.exits_for_step(step), schedule,
                             cfg.grad_clip, device, autocast=cfg.mixed_precision and device.type == "cuda", task=task)
        done = step + 1
        if rank == 0:
            pending += [(k, v, done) for k, v in metrics.items()]
            pending.append(("lr", optimizer.param_groups[0]["lr"], done))
            elapsed = time.perf_counter() - t0
            if elapsed - last_print >= 5 or done == cfg.steps:
                rate = (done - start_step) / elapsed
                eta = (cfg.steps - done) / max(rate, 1e-9)
                _say(f"[train] step {done}/{cfg.steps}  loss {metrics['loss']:.3f}  {rate:.2f} steps/s  "
                     f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
                last_print = elapsed
        is_eval = done % cfg.eval_every == 0 or done == cfg.steps
        if done % cfg.checkpoint_every == 0 or is_eval:
            pending = report_checkpoint(done, metrics, is_eval, pending)
    if start_step >= cfg.steps:
        # the newest checkpoint on storage is the last step, written by workers whose run was stopped before
        # Ray Train registered it: reported again, so that it (not an older registered one) is the result
        report_checkpoint(start_step, {}, True, pending)


def _say(line: str) -> None:
    """A progress line from a Train worker, printed once: Ray Train's patched print() tees a line printed to a
    redirected sys.stdout AND logs it, so the driver showed every line twice; an explicit file is printed as is."""
    print(line, file=sys.__stderr__, flush=True)  # stderr: stdout carries --json


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


def run_training(cfg: TrainConfig, *, data_root: str | Path, ctx: RunContext, name: str | None = None) -> dict:
    """Train a new parent of the config's task on the dataset at ``data_root`` (COCO panoptic or instance
    files); returns a summary with the run name,
    MLflow run id and the registered model version. A name already taken is refused (resume it instead)."""
    from eco_ray.config import to_yaml
    from eco_ray.tracking import Stage, Tag

    data_root = _absolute(str(data_root))
    if cfg.model.pretrained:
        cfg.model.pretrained = _absolute(cfg.model.pretrained)
    name = name or new_run_name()
    base = ctx.train_dir(name)
    if (base / "run.json").exists():
        raise ConfigError(f"a training run named {name!r} exists already; resume it with --resume {name} "
                          f"or pick another --name")
    facts = check_inputs(cfg, data_root)  # before Ray starts
    cfg.model.num_labels = facts["num_labels"]
    tracker = ctx.tracker()
    base.mkdir(parents=True, exist_ok=True)
    write_text(base / "config.yaml", to_yaml(cfg))
    run_id = tracker.start_run(Stage.TRAIN, name, {Tag.DATA_HASH: facts["data_hash"],
                                                   Tag.CONFIG_HASH: content_hash(train_config_key(cfg))},
                               {**asdict(cfg), "data_root": data_root})
    info = {"name": name, "run_id": run_id, "tracking_uri": ctx.tracking_uri, "data_hash": facts["data_hash"],
            "data_root": data_root}
    _write_json(base / "run.json", info)
    return _fit(cfg, name, base, info, facts, ctx)


def resume_training(name: str, ctx: RunContext) -> dict:
    """Continue the stopped run ``name`` from its last checkpoint, with its saved config, in its MLflow run."""
    from eco_ray.config import load_config

    base = ctx.train_dir(name)
    if not (base / "run.json").is_file():
        raise ConfigError(f"cannot resume {name!r}: {base / 'run.json'} not found")
    info = json.loads((base / "run.json").read_text())
    # runs saved before these became arguments kept them in their config
    schema = train_config_type(requested("task", base / "config.yaml", default=TrainConfig.task))
    cfg = load_config(schema, base / "config.yaml", renamed=dict.fromkeys(("data_root", "run_dir", "experiment")))
    if "data_root" not in info:
        info["data_root"] = _legacy_data_root(base)
    facts = check_inputs(cfg, info["data_root"])
    cfg.model.num_labels = facts["num_labels"]
    ctx = RunContext(ctx.run_dir, info["tracking_uri"], ctx.address, ctx.experiment)
    ctx.tracker().set_tags(info["run_id"], {"resumed_at": datetime.now(timezone.utc).isoformat()})
    return _fit(cfg, name, base, info, facts, ctx)


def _legacy_data_root(base: Path) -> str:
    """Runs started before the data root was an argument kept it in their config.yaml."""
    import yaml

    doc = yaml.safe_load((base / "config.yaml").read_text()) or {}
    if "data_root" not in doc:
        raise ConfigError(f"{base}: run.json names no data_root and config.yaml has none either")
    return _absolute(str(doc["data_root"]))


def _fit(cfg: TrainConfig, name: str, base: Path, info: dict, facts: dict, ctx: RunContext) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = cfg.storage_path or str(ctx.ray_storage.resolve())
    storage_run_path = f"{storage.rstrip('/')}/{name}"
    init_ray(ctx.address, log_to_driver=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train_config": asdict(cfg), "run_id": info["run_id"], "tracking_uri": info["tracking_uri"],
                           "storage_run_path": storage_run_path, "data_root": info["data_root"]},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    t0 = time.perf_counter()
    tracker = ctx.tracker()
    try:
        result = trainer.fit()
    except Exception as e:
        tracker.set_tags(info["run_id"], {"status": "failed"})
        raise TrainRunError(f"training run {name} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                            f"Fix the cause and continue it with `eco-ray train --resume {name}` (progress up to the "
                            "last checkpoint is kept).") from e
    return _finish(cfg, name, base, info["run_id"], tracker, facts, result, time.perf_counter() - t0)


def _finish(cfg: TrainConfig, name: str, base: Path, run_id: str, tracker, facts: dict, result,
            seconds: float) -> dict:
    """Final weights + config, the plot of the validation metric per exit, artifacts and the registered model
    version."""
    from safetensors.torch import load_model

    from eco_ray.model.io import build_parent, save_parent
    from eco_ray.plots import plot_metric_per_exit
    from eco_ray.tracking import Tag

    task = get_task(cfg.task)
    model = build_parent(cfg.model)
    with result.checkpoint.as_directory() as d:
        load_model(model, os.path.join(d, CHECKPOINT_WEIGHTS))
        state = json.loads(Path(d, CHECKPOINT_STATE).read_text())
    parent_dir = save_parent(model, base / "parent", extra={
        "categories": facts["categories"], "data_hash": facts["data_hash"], "train_run": name, "steps": state["step"]})
    metrics = result.metrics or {}
    per_exit = {key: {k: metrics.get(f"val_{key}_exit{k}") for k in model.exits} for key, _ in task.validation_series}
    main = per_exit[task.metric]
    plot = plot_metric_per_exit(metrics, model.exits, base / f"{task.metric}_per_exit.png", name,
                                task.validation_series)
    tracker.log_artifacts(run_id, parent_dir, "parent")
    if plot:
        tracker.log_artifact(run_id, plot)
    tracker.log_metrics(run_id, {"train_seconds": seconds})
    version = tracker.register(cfg.registered_model, run_id, "parent", tags={
        Tag.DATA_HASH: facts["data_hash"], Tag.CONFIG_HASH: content_hash(train_config_key(cfg)), "train_run": name,
        "steps": state["step"], **{f"val_{task.metric}_exit{k}": f"{v:.4f}" for k, v in main.items() if v is not None}},
        description=f"eco-ray early-exit {task.model_name} parents (Step A)")
    tracker.end_run(run_id)
    summary = {"name": name, "run_id": run_id, "tracking_uri": tracker.uri, "steps": state["step"],
               "seconds": round(seconds, 1), "parent_dir": str(parent_dir), "registered_model": cfg.registered_model,
               "version": version, "model_uri": f"models:/{cfg.registered_model}/{version}", "task": task.name,
               "metric": task.metric, **{f"val_{key}_per_exit": v for key, v in per_exit.items()}}
    _write_json(base / "summary.json", summary)  # atomic: a resumed pipeline reads it
    return summary
