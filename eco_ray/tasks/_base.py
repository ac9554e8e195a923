"""The interface every task implements."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np


class Task:
    name: str
    metric: str  # the validation metric per exit, logged as val_<metric>_exit<k>: "pq" | "ap"
    metric_label: str  # as people write it: "PQ" | "AP"
    validation_series: tuple[tuple[str, str], ...]  # (key, label) of the validation metrics, the main one first
    model_name: str  # the parent, as people call it
    parent_name: str  # the parent's default name in the model registry
    annotation_kind: str  # the COCO annotation files it reads: annotations/<kind>_<split>.json
    route: str  # the Serve endpoint that answers it: POST /v1/<route>
    response_items: str  # the list a response holds: "segments" | "detections"
    compact_query: str = ""  # the query options of the smallest response (the pipeline's serving check)
    gate_name: str  # the gate's default name in the model registry

    # ---------------------------------------------------------------------------------------------- data
    def annotation_file(self, root: str | Path, split: str) -> Path:
        return Path(root) / "annotations" / f"{self.annotation_kind}_{split}.json"

    def open_dataset(self, root: str | Path, split: str):
        raise NotImplementedError

    def categories(self, dataset) -> list[dict]:
        """The COCO categories of the parent's classes, in class-index order."""
        raise NotImplementedError

    def make_batch(self, dataset, indices: Sequence[int], image_size: int, rng: np.random.Generator,
                   train: bool) -> dict:
        """The samples ``indices`` as one batch with ``pixel_values`` and what ``losses`` reads (training:
        randomly augmented with ``rng``)."""
        raise NotImplementedError

    def training_batches(self, dataset, batch_size: int, image_size: int, seed: int, rank: int = 0,
                         world_size: int = 1, start_step: int = 0) -> Iterator[dict]:
        """Endless shuffled batches of this worker's shard (every ``world_size``-th image from ``rank``);
        ``start_step`` gives a resumed run a fresh order."""
        shard = np.arange(rank, len(dataset), world_size)
        if len(shard) < batch_size:
            raise ValueError(f"worker {rank} has {len(shard)} training images, fewer than its batch of {batch_size}")
        epoch = 0
        while True:
            rng = np.random.default_rng([seed, rank, start_step, epoch])
            order = rng.permutation(shard)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield self.make_batch(dataset, [int(i) for i in order[start:start + batch_size]], image_size, rng,
                                      train=True)
            epoch += 1

    # --------------------------------------------------------------------------------------------- model
    def losses(self, core, outputs: dict, batch: dict, device) -> dict:
        """The loss of each exit in ``outputs`` (exit -> the model's output) against the batch's targets."""
        raise NotImplementedError

    def validate(self, core, dataset, num_images: int, batch_size: int = 16) -> dict[str, float]:
        """Validation metrics at every exit on the first ``num_images`` images: ``val_<metric>_exit<k>`` and
        the task's other keys."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- Step B
    def derive_part(self, model, dataset, indices: Sequence[int], views: Sequence[str], settings,
                    autocast: bool) -> dict:
        """One Step B chunk: every exit of every view of ``indices``, as plain arrays for the driver
        (``image_ids``, ``gate_features``, ``kinds``, ``num_objects`` and the task's statistics)."""
        raise NotImplementedError

    def assemble_split(self, split: str, parts: list[dict], views: Sequence[str], settings, map_blocks=None):
        """The derived split of a table from its chunks (in any order). ``map_blocks(fn, [args, ...])`` runs
        ``fn(*args)`` for each item where the stage says (Ray tasks in Step B) and returns the results in order:
        for work on the whole split that parts of it can do apart."""
        raise NotImplementedError

    def split_summary(self, split, categories: list[dict], tolerance: float) -> dict:
        """The manifest's summary of a split: ``static`` (exit -> the task's metrics), the label noise floor, ..."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ serving
    def category_set(self, categories: Sequence[dict]):
        """The parent's categories (its record's COCO list) as the ``CategorySet`` its predictions index."""
        from eco_ray.metrics.panoptic import CategorySet

        return CategorySet(categories)

    def response_options(self, params: Mapping[str, str]) -> dict:
        """The task's own query parameters of a request (``mask_format``, ``min_score``, ...), checked: an
        ``InputError`` (422) for a bad one, before the request joins a batch."""
        raise NotImplementedError

    def predictions(self, output, engine, sizes: Sequence[tuple[int, int]]) -> list:
        """The parent's output on a served batch -> one prediction per image; ``sizes[i]``: image i's own
        (height, width). A prediction may stay at the model's input size until :meth:`response`."""
        raise NotImplementedError

    def response(self, prediction, size: tuple[int, int], engine, options: dict) -> dict:
        """One image's prediction as the task's part of the JSON response, at the image's own size."""
        raise NotImplementedError


def image_attributes(meta: Sequence[dict]) -> dict:
    """The generator's image attributes a table keeps (for other datasets: "" and -1)."""
    return {"kinds": [m.get("eco_kind", "") for m in meta],
            "num_objects": [int(m.get("eco_num_objects", -1)) for m in meta]}
