"""The training loop's parts, plain torch: exit schedule, optimiser, batches, one step, validation. What
depends on the task (batches, losses, validation metrics) is the task's (eco_ray/tasks).

Ray Train runs them on every worker (eco_ray/train/ray_train.py); tests and notebooks can run them
directly. The exit of a step is a pure function of (seed, step), so every data-parallel worker trains
the same exit and a resumed run continues the same schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from eco_ray.model.exits import EarlyExitModel
from eco_ray.tasks import Task, get_task


class ExitSchedule:
    """Weighted stochastic depth: which exits a step trains, and each exit's loss weight alpha_k."""

    def __init__(self, exits: Sequence[int], sampling: str = "uniform", alpha: str = "depth", seed: int = 0):
        self.exits = [int(k) for k in exits]
        self.sampling, self.alpha_rule, self.seed = sampling, alpha, seed
        weights = np.ones(len(self.exits)) if sampling != "deep" else np.asarray(self.exits, float)
        self.probs = weights / weights.sum()
        self.depth = max(self.exits)

    def exits_for_step(self, step: int) -> list[int]:
        if self.sampling == "all":
            return list(self.exits)
        rng = np.random.default_rng([self.seed, step])
        if self.sampling == "deepest_plus_one":
            # the "sandwich rule" of slimmable networks: the deepest exit gets a gradient every step, as in a
            # plain Mask2Former, and one shallower exit (uniform) rides along on the same encoder pass
            shallower = self.exits[:-1]
            return ([int(rng.choice(shallower))] if shallower else []) + [self.exits[-1]]
        return [int(rng.choice(self.exits, p=self.probs))]

    @property
    def every_step_reaches_the_deepest_exit(self) -> bool:
        """Every step reaches the last exit: if that exit is also the last encoder layer, every parameter gets
        a gradient every step and DDP can skip its search for unused ones (the caller checks the layer)."""
        return self.sampling in ("all", "deepest_plus_one") or self.exits == [self.depth]

    def alpha(self, k: int) -> float:
        if self.alpha_rule == "depth":
            return k / self.depth
        if self.alpha_rule == "depth_plus_one":
            return (k + 1) / (self.depth + 1)
        if self.alpha_rule == "depth_sq":
            return (k / self.depth) ** 2
        return 1.0


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def training_batches(dataset, batch_size: int, image_size: int, seed: int, rank: int = 0, world_size: int = 1,
                     start_step: int = 0, task: Task | None = None) -> Iterator[dict]:
    """Endless shuffled, augmented batches of this worker's shard (the task's ``training_batches``)."""
    return (task or get_task("panoptic")).training_batches(dataset, batch_size, image_size, seed, rank, world_size,
                                                           start_step)


def train_step(model: nn.Module, core: EarlyExitModel, optimizer: torch.optim.Optimizer, batch: dict,
               exits: Sequence[int], schedule: ExitSchedule, grad_clip: float, device: torch.device,
               autocast: bool = False, task: Task | None = None) -> dict[str, float]:
    """One optimiser step on the weighted sum of the losses of ``exits`` (each the task's loss). ``model``
    may be the DDP wrapper of ``core``; it is called exactly once, so that DDP sees one forward per backward."""
    task = task or get_task("panoptic")
    x = batch["pixel_values"].to(device)
    optimizer.zero_grad(set_to_none=True)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    with ctx:
        if len(exits) == 1:
            outputs = {exits[0]: model(x, exit=exits[0])}
        else:
            outputs = model(x, exits=list(exits))
        losses = task.losses(core, {k: outputs[k] for k in exits}, batch, device)
        total = sum(schedule.alpha(k) * loss for k, loss in losses.items())
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), grad_clip) if grad_clip > 0 else torch.tensor(0.0)
    optimizer.step()
    metrics = {"loss": float(total.detach()), "grad_norm": float(grad_norm)}
    metrics.update({f"loss_exit{k}": float(v.detach()) for k, v in losses.items()})
    return metrics


def validate(core: EarlyExitModel, dataset, num_images: int, batch_size: int = 16, task: Task | None = None
             ) -> dict[str, float]:
    """The task's validation metrics at every exit on the first ``num_images`` validation images (panoptic:
    PQ all / things / stuff and mIoU; detection: COCO AP, AP50, AP75)."""
    return (task or get_task("panoptic")).validate(core, dataset, num_images, batch_size)
