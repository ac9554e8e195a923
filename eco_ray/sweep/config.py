"""The sweep's settings. The derived table it sweeps over and where it runs are arguments, not settings."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from eco_ray.budget import Budget

SAMPLERS = ("tpe", "nsga2", "random")
TASK_SPACES = {"panoptic": "default", "detection": "detection"}  # what space "default" means, per table task
OBJECTIVE_COSTS = {"gflops": "encoder_gflops_mean", "latency": "latency_ms_mean"}
# keys that were settings before and are arguments now: refused with the flag that replaced them
MOVED_KEYS = {"derived": "!pass it with --derived (the pipeline: set by the derive stage)",
              "run_dir": "!pass it with --run-dir", "experiment": "!pass it with --experiment"}
# what a sweep saved before a setting existed did instead: held-out selection came later, and such a sweep
# goes on scoring its trials on the eval split when resumed
ABSENT_IN_OLD_SWEEPS = {"holdout": 0.0}


@dataclass
class SweepConfig:
    # a search-space YAML file, or the name of a shipped one (eco_ray/resources/search_spaces); "default" is the
    # shipped space of the table's task: default.yaml (panoptic), detection.yaml (its labels are a detector's)
    space: str = "default"
    trials: int = 40  # finished trials the sweep ends with
    concurrency: int = 2  # trials at a time
    sampler: str = "tpe"  # tpe | nsga2 | random
    seed: int = 0
    nsga2_population: int = 16
    objective_cost: str = "gflops"  # the cost objective: gflops (mean encoder GFLOPs) | latency (mean ms)
    max_gflops: float | None = None  # budget on mean encoder GFLOPs (an Optuna constraint)
    max_latency_ms: float | None = None  # budget on mean latency
    storage: str | None = None  # Optuna storage URL; default sqlite in the sweep directory
    cpus_per_trial: float = 1.0
    train_split: str = "train"
    eval_split: str = "val"
    # share of the training split's images held out of every trial's gate fit: the objectives, the budget
    # and `eco-ray select` use them, so the eval split is never selected on and its PQ stays an unbiased
    # estimate; 0 = select on the eval split itself (optimistic: the best of many trials on the same images)
    holdout: float = 0.25

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.objective_cost not in OBJECTIVE_COSTS:
            raise ValueError(f"objective_cost must be one of {list(OBJECTIVE_COSTS)}, got {self.objective_cost!r}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.trials < 1 or self.concurrency < 1 or self.nsga2_population < 2 or self.cpus_per_trial <= 0:
            raise ValueError("need trials >= 1, concurrency >= 1, nsga2_population >= 2, cpus_per_trial > 0")
        for name in ("max_gflops", "max_latency_ms"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v}")

    def space_for(self, task: str) -> str:
        """The search space a sweep over a table of ``task`` samples."""
        return TASK_SPACES.get(task, self.space) if self.space == "default" else self.space

    @property
    def objective_key(self) -> str:
        return OBJECTIVE_COSTS[self.objective_cost]

    def budgets(self) -> list[Budget]:
        """The budgets the sweep's trials are constrained by (Optuna constraints)."""
        return [Budget.named(name, getattr(self, name)) for name in ("max_gflops", "max_latency_ms")
                if getattr(self, name) is not None]


def mask_url(url: str | None) -> str | None:
    """A storage URL with its password replaced by ``***``: what reaches files, logs and MLflow."""
    if not url:
        return url
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def has_masked_password(url: str | None) -> bool:
    return bool(url) and ":***@" in url
