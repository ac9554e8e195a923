"""The task axis: what a pipeline stage asks of the task it runs, panoptic segmentation or object detection.

A stage holds a :class:`Task` (``get_task(name)``) and calls it for everything that depends on the task: the
dataset and its annotation files, the parent's config type and presets, training batches and losses,
validation, names in the model registry. Everything else (Ray Train, checkpoints, MLflow, the exit schedule)
is one code path. One private module per task, as Optuna keeps one per sampler.
"""

from __future__ import annotations

from eco_ray.tasks._base import Task

TASKS = ("panoptic", "detection")


def get_task(name: str) -> Task:
    """The task called ``name`` (``panoptic`` or ``detection``); a ValueError naming the known ones otherwise."""
    if name == "panoptic":
        from eco_ray.tasks._panoptic import PanopticTask

        return PanopticTask()
    if name == "detection":
        from eco_ray.tasks._detection import DetectionTask

        return DetectionTask()
    raise ValueError(f"unknown task {name!r}: one of {', '.join(TASKS)}")


__all__ = ["TASKS", "Task", "get_task"]
