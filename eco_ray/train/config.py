"""Step A configuration: one dataclass, YAML, ``key=value`` overrides, and a model preset underneath."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eco_ray.config import ConfigError, load_config
from eco_ray.model.config import TASKS, DetectionModelConfig, ModelConfig, preset_names, preset_path

EXIT_SAMPLING = ("uniform", "deep", "deepest_plus_one", "all")
ALPHA = ("depth", "depth_sq", "uniform", "depth_plus_one")


# keys that were settings before and are arguments now: refused with the flag that replaced them
MOVED_KEYS = {"data_root": "!pass it with --data-root (the pipeline: data.root)", "run_dir": "!pass it with --run-dir",
              "experiment": "!pass it with --experiment"}


@dataclass
class TrainConfig:
    """Step A. The dataset it trains on and where its run lives are arguments of ``run_training``."""

    task: str = "panoptic"  # panoptic (the early-exit Mask2Former) | detection (DetectionTrainConfig)
    model_preset: str = "small"  # a preset of the task (panoptic: tiny | small | swin-t): the defaults under `model`
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 4000  # optimiser steps
    batch_size: int = 8  # global batch, split over the workers
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    grad_clip: float = 1.0
    # weighted stochastic depth: which exit(s) each step trains, and the loss weight alpha_k of exit k
    # uniform over exits | deep (probability ~ depth) | deepest_plus_one (the deepest exit and one shallower
    # exit, uniform, every step) | all (every exit, every step)
    exit_sampling: str = "uniform"
    # depth: k / K (the official code) | depth_sq: k^2 / K^2 | uniform: 1 | depth_plus_one: (k+1) / (K+1), which
    # gives exit 0 (no encoder layer) a weight
    alpha: str = "depth"
    eval_every: int = 1000  # steps between validations (PQ per exit on eval_images validation images)
    eval_images: int = 100
    checkpoint_every: int = 250  # steps between checkpoints
    keep_checkpoints: int = 3
    num_workers: int = 2  # Ray Train data-parallel workers
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    mixed_precision: bool = False  # bf16 autocast on GPU
    seed: int = 0
    storage_path: str | None = None  # Ray Train storage; default <run_dir>/ray; s3://... on a cluster
    registered_model: str = "eco-parent"
    max_failures: int = 3  # worker failures Ray Train recovers from (restarts from the last checkpoint)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if not isinstance(self.model, train_config_type(self.task).model_type()):
            raise ValueError(f"task {self.task!r} needs its own train config (load_train_config picks it from "
                             f"the task); this one holds a {type(self.model).__name__}")
        if self.exit_sampling not in EXIT_SAMPLING:
            raise ValueError(f"exit_sampling must be one of {EXIT_SAMPLING}, got {self.exit_sampling!r}")
        if self.alpha not in ALPHA:
            raise ValueError(f"alpha must be one of {ALPHA}, got {self.alpha!r}")
        for name in ("steps", "batch_size", "num_workers", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of num_workers {self.num_workers}")
        if self.lr <= 0 or self.cpus_per_worker <= 0:
            raise ValueError("lr and cpus_per_worker must be > 0")
        self.model.validate()
        if 0 in self.model.exits and self.alpha in ("depth", "depth_sq"):
            raise ValueError(f"alpha={self.alpha} weighs exit 0 by 0: it would never train; use alpha=depth_plus_one")
        if 0 in self.model.exits and self.exit_sampling == "deep":
            raise ValueError("exit_sampling=deep never samples exit 0; use deepest_plus_one or uniform")


    @staticmethod
    def model_type() -> type:
        return ModelConfig


@dataclass
class DetectionTrainConfig(TrainConfig):
    """Step A for the early-exit Deformable DETR: the same settings, a detector under ``model``."""

    task: str = "detection"
    model_preset: str = "small"  # a detector preset: tiny | small
    model: DetectionModelConfig = field(default_factory=DetectionModelConfig)
    lr: float = 2e-4  # Deformable DETR's learning rate, weight decay and gradient clipping (not its 0.1x rate
    # for the sampling offsets and reference points: one rate for all)
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    registered_model: str = "eco-det-parent"

    @staticmethod
    def model_type() -> type:
        return DetectionModelConfig


def train_config_key(cfg: TrainConfig) -> dict:
    """The config as reuse keys and hashes see it: a panoptic config without its ``task``, so that runs made
    before the task existed keep their keys (and their reuse)."""
    from dataclasses import asdict

    d = asdict(cfg)
    if d.get("task") == "panoptic":
        del d["task"]
    return d


def train_config_type(task: str) -> type[TrainConfig]:
    if task not in TASKS:
        raise ConfigError(f"bad config value for 'task': {task!r} is not one of {', '.join(TASKS)}")
    return DetectionTrainConfig if task == "detection" else TrainConfig


def preset_layer(preset: str, task: str = "panoptic") -> dict:
    """The model defaults of a preset of the task, as a config layer under ``model``."""
    from omegaconf import OmegaConf

    if preset not in preset_names(task):
        raise ConfigError(f"bad config value for 'model_preset': {preset!r} is not one of the {task} presets "
                          f"{preset_names(task)}")
    return {"model": OmegaConf.to_container(OmegaConf.create(preset_path(preset, task).read_text()))}


def requested(key: str, path: str | Path | None, overrides=(), prefix: str = "", default=None) -> str:
    """The value of ``key`` that a file and overrides ask for (``prefix``: where the TrainConfig sits, e.g.
    ``train.``), before the config is built: the task picks the schema, the preset the defaults."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.load(path) if path is not None and Path(path).is_file() else OmegaConf.create()
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist([o for o in overrides if "=" in o]))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config: {str(e).splitlines()[0]}") from None
    node = OmegaConf.select(raw, prefix + key)
    return str(node if node is not None else default)


def requested_preset(path: str | Path | None, overrides=(), prefix: str = "") -> str:
    """The ``model_preset`` a file and overrides ask for."""
    task = requested("task", path, overrides, prefix, TrainConfig.task)
    return requested("model_preset", path, overrides, prefix, train_config_type(task).model_preset)


def load_train_config(path: str | Path | None = None, overrides=()) -> TrainConfig:
    """Defaults of the task <- the model preset named by ``model_preset`` <- the YAML file <- ``key=value``
    overrides."""
    task = requested("task", path, overrides, default=TrainConfig.task)
    return load_config(train_config_type(task), path, overrides,
                       layers=[preset_layer(requested_preset(path, overrides), task)], renamed=MOVED_KEYS)
