"""Where a job runs: the run directory, the MLflow tracking URI, the Ray cluster and the MLflow experiment.

Built once (by the CLI, from ``--run-dir``, ``--tracking-uri``, ``--address``, or by a caller) and handed to
every stage, so that none of them re-derives a default or receives the same fact by two channels.

    <run_dir>/data                 the generated benchmark (pipeline)
    <run_dir>/train/<name>         Step A runs (config, run.json, summary, parent)
    <run_dir>/ray                  Ray Train and Tune storage (shared storage on a multi-node cluster)
    <run_dir>/derived/<key>        Step B tables
    <run_dir>/gates/<name>         Step C gates (eco-ray gate)
    <run_dir>/sweeps/<name>        sweeps (config, Optuna SQLite, trials, front, plot)
    <run_dir>/pipeline/<name>      the pipeline's state and summary
    <run_dir>/mlflow.db, mlartifacts   the embedded MLflow store (unless a tracking URI is given)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUN_DIR = "runs"
DEFAULT_EXPERIMENT = "eco-ray"


@dataclass(frozen=True)
class RunContext:
    run_dir: Path
    tracking_uri: str
    address: str | None = None  # an existing Ray cluster (``auto``, ``ray://...``); None starts a local one
    experiment: str = DEFAULT_EXPERIMENT

    @classmethod
    def create(cls, run_dir: str | Path | None = None, tracking_uri: str | None = None, address: str | None = None,
               experiment: str | None = None) -> RunContext:
        """Defaults: ``runs``, ``$MLFLOW_TRACKING_URI`` else SQLite under the run directory, a local Ray,
        the ``eco-ray`` experiment. Nothing is created on disk until a stage writes."""
        from eco_ray.tracking import default_tracking_uri

        root = Path(run_dir or DEFAULT_RUN_DIR).resolve()
        return cls(root, tracking_uri or default_tracking_uri(root), address or None, experiment or DEFAULT_EXPERIMENT)

    def tracker(self):
        from eco_ray.tracking import Tracker

        return Tracker.of(self)

    # the layout under run_dir
    def train_dir(self, name: str) -> Path:
        return self.run_dir / "train" / name

    def derived_dir(self, key: str) -> Path:
        return self.run_dir / "derived" / key

    def gate_dir(self, name: str) -> Path:
        return self.run_dir / "gates" / name

    def sweep_dir(self, name: str) -> Path:
        return self.run_dir / "sweeps" / name

    def pipeline_dir(self, name: str) -> Path:
        return self.run_dir / "pipeline" / name

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def ray_storage(self) -> Path:
        return self.run_dir / "ray"
