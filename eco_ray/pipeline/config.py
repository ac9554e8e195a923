"""The pipeline's one config tree: a typed section per stage, each the same dataclass as that stage's own
command (``eco-ray train --set steps=...`` is ``--set train.steps=...`` here).

    name, run_dir                     the job: state under <run_dir>/pipeline/<name>
    data:    root | generate (train_images, val_images, synth: SynthConfig)
    train:   TrainConfig    (Step A; train.task: panoptic | detection; model preset under train.model_preset,
                             train.model.* overrides it)
    derive:  DeriveConfig   (Step B)
    sweep:   SweepConfig    (Step C)
    select:  budget, limit, registered_gate, alias
    serve:   config, host, port, requests

The keys of the flat layout that came before (``train_images``, ``synth.*``, ``budget``, ``limit``, ``requests``,
``port``, ...) keep working: they are moved to their section. Every stage runs the task of ``train.task``
(``eco-ray pipeline --config detection``: the detector). Settings that are now handed from stage to
stage (``derive.parent``, ``sweep.derived``, ``train.data_root``, ``*.run_dir``) are refused, naming what
replaced them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eco_ray.budget import Budget, BudgetError
from eco_ray.config import ConfigError, load_config
from eco_ray.data.synth import SynthConfig
from eco_ray.derive.config import DeriveConfig
from eco_ray.resources import resolve_resource
from eco_ray.sweep.config import SweepConfig
from eco_ray.train.config import DetectionTrainConfig, TrainConfig, preset_layer, requested, requested_preset

STAGES = ("data", "train", "derive", "sweep", "select", "serve")

_FLOWS = "!the pipeline hands it from stage to stage"
RENAMED = {
    "data_root": "data.root", "train_images": "data.train_images", "val_images": "data.val_images",
    "synth": "data.synth", "budget": "select.budget", "limit": "select.limit",
    "registered_gate": "select.registered_gate", "alias": "select.alias", "serve_config": "serve.config",
    "host": "serve.host", "port": "serve.port", "requests": "serve.requests",
    "train.data_root": "!the pipeline trains on data.root (or the data it generates)",
    "train.run_dir": "!use run_dir (top level) or --run-dir", "train.experiment": "!use --experiment",
    "derive.parent": _FLOWS + " (the train stage's parent)", "derive.data_root": "!use data.root",
    "derive.out": _FLOWS + " (under <run_dir>/derived)", "derive.run_dir": "!use run_dir (top level) or --run-dir",
    "derive.experiment": "!use --experiment", "sweep.derived": _FLOWS + " (the derive stage's table)",
    "sweep.run_dir": "!use run_dir (top level) or --run-dir", "sweep.experiment": "!use --experiment",
}


@dataclass
class DataStage:
    root: str | None = None  # a COCO dataset you bring (panoptic files, or instances for a detector); None: generate
    # the benchmark into <run_dir>/data
    train_images: int = 6000
    val_images: int = 300
    synth: SynthConfig = field(default_factory=SynthConfig)

    def validate(self) -> None:
        if self.train_images < 1 or self.val_images < 1:
            raise ValueError("data.train_images and data.val_images must be >= 1")


@dataclass
class SelectStage:
    budget: str = "max_relative_gflops"  # a budget name (eco_ray/budget.py); relative: a share of full depth
    limit: float = 0.7  # 0.7 of the full-depth encoder GFLOPs: save 30%
    registered_gate: str | None = None  # default: the task's (eco-gate, eco-det-gate for a detector)
    alias: str = "production"

    def to_budget(self) -> Budget:
        return Budget.named(self.budget, self.limit)

    def validate(self) -> None:
        try:
            self.to_budget()
        except BudgetError as e:
            raise ValueError(f"select.budget={self.budget!r}, select.limit={self.limit!r}: {e}") from None


@dataclass
class ServeStage:
    config: str | None = None  # a Serve config file (default: the shipped one)
    host: str = "127.0.0.1"
    port: int = 8000
    requests: int = 8  # validation images sent to the started app; 0 skips the serving check

    def validate(self) -> None:
        if self.requests < 0:
            raise ValueError("serve.requests must be >= 0")


@dataclass
class PipelineConfig:
    name: str = "default"  # state and summary under <run_dir>/pipeline/<name>
    run_dir: str | None = None  # where the job runs (default runs); --run-dir wins
    data: DataStage = field(default_factory=DataStage)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=5000, exit_sampling="deepest_plus_one", eval_every=2500, checkpoint_every=600))
    derive: DeriveConfig = field(default_factory=lambda: DeriveConfig(max_images=2000))
    sweep: SweepConfig = field(default_factory=lambda: SweepConfig(trials=40))
    select: SelectStage = field(default_factory=SelectStage)
    serve: ServeStage = field(default_factory=ServeStage)

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")


@dataclass
class DetectionPipelineConfig(PipelineConfig):
    """The same tree with a detector under ``train`` (``train.task=detection``), its state apart from the
    segmenter's."""

    name: str = "detection"
    train: DetectionTrainConfig = field(default_factory=lambda: DetectionTrainConfig(
        steps=5000, exit_sampling="deepest_plus_one", eval_every=2500, checkpoint_every=600))


def load_pipeline_config(path: str | Path | None = None, overrides=()) -> PipelineConfig:
    """Defaults <- the train section's model preset <- the file (a path or a shipped name: ``smoke``,
    ``detection``) <- overrides. ``train.task`` picks the tree's train section."""
    if path is not None:
        path = resolve_resource("pipelines", path)
    task = requested("task", path, overrides, prefix="train.", default="panoptic")
    if task not in ("panoptic", "detection"):
        raise ConfigError(f"bad config value for 'train.task': {task!r} is not one of panoptic, detection")
    schema = DetectionPipelineConfig if task == "detection" else PipelineConfig
    preset = requested_preset(path, overrides, prefix="train.")
    return load_config(schema, path, overrides, layers=[{"train": preset_layer(preset, task)}], renamed=RENAMED)
