"""Step B's settings. What the table is derived FROM (the parent, the dataset root) and where it goes are
arguments of ``run_derive``, not settings: the same settings derive any parent's table."""

from __future__ import annotations

from dataclasses import dataclass, field

from eco_ray.derive.table import VIEWS
from eco_ray.model.config import GATE_INPUTS, OVERLAP_THRESHOLD

# keys that were settings before and are arguments now: refused with the flag that replaced them
MOVED_KEYS = {"parent": "!pass it with --parent", "data_root": "!pass it with --data-root",
              "out": "!pass it with --out", "run_dir": "!pass it with --run-dir",
              "experiment": "!pass it with --experiment"}


@dataclass
class DeriveConfig:
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    views: list[str] = field(default_factory=lambda: list(VIEWS))  # view 0 must be "plain"
    max_images: int = 0  # per split; 0 = all
    chunk_size: int = 64  # images per Ray task
    batch_size: int = 16  # images per forward inside a task
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0  # > 0: each task gets (a share of) a GPU and runs the parent there, in bf16
    threshold: float = 0.5  # panoptic post-processing: query score threshold
    mask_threshold: float = 0.5
    overlap_threshold: float = OVERLAP_THRESHOLD  # a query keeps a segment only if it wins this share of its mask
    measure_latency: bool = True  # time every exit on this machine (else GFLOPs only)
    latency_repeats: int = 20
    gate_input: str | None = None  # stride32 | levels; default: the parent's (ModelConfig.gate_input)
    sufficient_tolerance: float = 0.02  # a label within this of the deepest exit's counts as sufficient
    label_block: int = 256  # detection: each image's contribution to the AP is measured within blocks of this many

    def validate(self) -> None:
        if not self.splits:
            raise ValueError("splits must name at least one split")
        if not self.views or self.views[0] != "plain" or set(self.views) - set(VIEWS) or \
                len(set(self.views)) != len(self.views):
            raise ValueError(f"views must start with 'plain' and use each of {list(VIEWS)} at most once, "
                             f"got {self.views}")
        for name in ("chunk_size", "batch_size", "latency_repeats", "label_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_images < 0 or self.cpus_per_task <= 0 or self.gpus_per_task < 0:
            raise ValueError("max_images must be >= 0, cpus_per_task > 0 and gpus_per_task >= 0")
        if self.gate_input is not None and self.gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {self.gate_input!r}")
        if not all(0 <= t <= 1 for t in (self.threshold, self.mask_threshold, self.overlap_threshold)):
            raise ValueError("threshold, mask_threshold and overlap_threshold must lie in [0, 1]")
