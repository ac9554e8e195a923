"""The derived table of a detection parent (numpy + Arrow; no Ray, no model).

Per image, view and exit it holds the COCOeval matching records of the image's detections
(eco_ray.metrics.detection.DetectionRecords), from which the COCO AP of any exit assignment over any images
is exact; the gate input; and two per-image labels a gate can learn from:

- ``dap``: the image's linearised contribution to the dataset AP (the AP of its block of at most
  ``LABEL_BLOCK`` images by id, blocks of equal size, with the image moved from the deepest exit to exit k,
  minus the block's AP, times the block's size). The default: it is the label whose gain from depth agrees
  best between an image and its mirror (docs/results.md, "Object detection, first tranche");
- ``ap``: the image's own COCO AP (0 where it has no ground truth that counts).

On disk, beside ``manifest.json`` (``"task": "detection"``)::

    <split>.images.arrow      image_id, kind, num_objects, gate_features (as the panoptic table), and the
                              labels ``dap`` and ``ap``: fixed_size_list<float64>[V*E] in (view, exit) order
    <split>.detections.arrow  one row per detection: image_id, view, exit, category, score, matched and
                              ignored flags (DetectionRecords.to_arrow)
    <split>.truth.arrow       per image: the ground truths that count, per category and area range
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from eco_ray.metrics.detection import DetectionRecords, label_blocks

QUALITY_MEASURES = ("dap", "ap")
LABEL_BLOCK = 256
SUMMARY_KEYS = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "ap_small": "APs", "ap_medium": "APm",
                "ap_large": "APl", "ar100": "AR100"}


@dataclass
class DetectionSplit:
    split: str
    image_ids: np.ndarray  # (N,) int64, ascending
    exits: list[int]
    views: list[str]
    records: DetectionRecords
    gate_features: np.ndarray  # (N, d) float32
    kinds: np.ndarray  # (N,) str
    num_objects: np.ndarray  # (N,) int64
    labels: dict[str, np.ndarray]  # measure -> (N, V, E)
    label_block: int = LABEL_BLOCK
    _cache: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    task = "detection"
    metric = "ap"
    measures = QUALITY_MEASURES  # the label sources quality_of takes

    def __len__(self) -> int:
        return len(self.image_ids)

    # ------------------------------------------------------------------ labels
    @property
    def quality_per_view(self) -> np.ndarray:
        """(N, V, E) the default label, per view."""
        return self.labels[QUALITY_MEASURES[0]]

    @property
    def quality(self) -> np.ndarray:
        return self.quality_per_view.mean(axis=1)

    def quality_of(self, measure: str | None = QUALITY_MEASURES[0]) -> np.ndarray:
        """(N, E) a label averaged over the views: ``dap`` (the default, also for None) or ``ap``."""
        measure = QUALITY_MEASURES[0] if measure is None else measure
        if measure not in self.labels:
            raise ValueError(f"quality must be one of {QUALITY_MEASURES} for a detection table, got {measure!r}")
        return self.labels[measure].mean(axis=1)

    # ------------------------------------------------------------------ evaluation (the plain view)
    def metric_of(self, assign: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """(B,) COCO AP of B exit assignments (exit indices, (B, N)) with images counted ``counts`` times."""
        return self.records.ap_of(assign, counts, view=0)

    def summary_of(self, choice: np.ndarray, images: np.ndarray | None = None) -> dict[str, float]:
        """COCO's summary of one assignment: ap, ap50, ap75, ap_small/medium/large, ar100."""
        stats = self.records.ap(choice, 0, images=images)
        return {ours: float(stats[theirs]) for ours, theirs in SUMMARY_KEYS.items()}

    def operating_point(self, choice: np.ndarray, categories=None, costs: dict | None = None):
        """The exact AP (and AP50, AP75), costs and exit histogram of a per-image choice of exit indices."""
        from eco_ray.tradeoff import operating_point

        s = self.summary_of(choice)
        return operating_point(choice, costs or {}, self.exits, ap=s["ap"], ap50=s["ap50"], ap75=s["ap75"])

    def static_summaries(self) -> dict[int, dict[str, float]]:
        if "static" not in self._cache:
            self._cache["static"] = {int(k): self.summary_of(np.full(len(self), e)) for e, k in enumerate(self.exits)}
        return self._cache["static"]

    # ------------------------------------------------------------------ parts
    def subset(self, mask: np.ndarray, name: str | None = None) -> DetectionSplit:
        """The images of the boolean ``mask``, their labels as computed on the whole split."""
        mask = np.asarray(mask)
        return DetectionSplit(name or self.split, self.image_ids[mask], list(self.exits), list(self.views),
                              self.records.take(mask), self.gate_features[mask], self.kinds[mask],
                              self.num_objects[mask], {k: v[mask] for k, v in self.labels.items()}, self.label_block)

    def with_exits(self, exits: list[int]) -> DetectionSplit:
        """The same images with only ``exits``. Whose deepest exit is not this table's has its ``dap`` measured
        again from the new deepest exit, over these images (a subset's own blocks)."""
        from eco_ray.derive.table import DerivedDataError

        missing = sorted(set(exits) - set(self.exits))
        if missing:
            raise DerivedDataError(f"exits {missing} are not in the table; it has {self.exits}")
        idx = [self.exits.index(k) for k in exits]
        records = self.records.with_exits(exits)
        labels = {"ap": self.labels["ap"][..., idx]}
        # the contribution is measured from the deepest exit: another deepest exit needs it measured again
        labels["dap"] = self.labels["dap"][..., idx] if exits[-1] == self.exits[-1] else \
            records.contributions(self.label_block)
        return DetectionSplit(self.split, self.image_ids, list(exits), list(self.views), records, self.gate_features,
                              self.kinds, self.num_objects, labels, self.label_block)

    def hold_out(self, fraction: float, seed: int = 0) -> tuple[DetectionSplit, DetectionSplit]:
        from eco_ray.derive.table import held_out_mask

        mask = held_out_mask(self.image_ids, fraction, seed)
        return self.subset(~mask, f"{self.split}-fit"), self.subset(mask, f"{self.split}-holdout")

    # ------------------------------------------------------------------ storage
    def images_arrow(self) -> pa.Table:
        from eco_ray.derive.table import images_table

        cells = len(self.views) * len(self.exits)
        extra = {name: pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(
            self.labels[name], np.float64).reshape(-1)), cells) for name in QUALITY_MEASURES}
        meta = {b"eco_ray.label_block": str(self.label_block).encode()}
        return images_table(self.image_ids, self.kinds, self.num_objects, self.gate_features, self.exits,
                            self.views, extra, meta)

    def tables(self) -> dict[str, pa.Table]:
        detections, truth = self.records.to_arrow()
        return {"images": self.images_arrow(), "detections": detections, "truth": truth}

    @classmethod
    def from_tables(cls, split: str, tables: dict[str, pa.Table]) -> DetectionSplit:
        from eco_ray.derive.table import column

        images = tables["images"]
        meta = images.schema.metadata or {}
        exits, views = json.loads(meta[b"eco_ray.exits"]), json.loads(meta[b"eco_ray.views"])
        n = images.num_rows
        records = DetectionRecords.from_arrow(tables["detections"], tables["truth"])
        if records.image_ids.tolist() != column(images, "image_id").tolist():
            raise ValueError("the detections and the images tables hold different images")
        d = images.schema.field("gate_features").type.list_size
        labels = {name: column(images, name).reshape(n, len(views), len(exits)) for name in QUALITY_MEASURES}
        return cls(split, column(images, "image_id"), exits, views, records,
                   column(images, "gate_features").reshape(n, d),
                   np.asarray(images.column("kind").to_pylist(), dtype=object), column(images, "num_objects"),
                   labels, int(meta.get(b"eco_ray.label_block", str(LABEL_BLOCK).encode())))


TABLES = ("images", "detections", "truth")


def split_files(root: Path, name: str) -> list[Path]:
    return [Path(root) / f"{name}.{t}.arrow" for t in TABLES]


def block_labels(records: DetectionRecords, label_block: int) -> dict[str, np.ndarray]:
    """The labels of one block of images (all of ``records``): each image's contribution and its own AP."""
    return {"dap": records.contributions(max(label_block, len(records))), "ap": records.per_image_ap()}


def assemble(split: str, parts: list[dict], views: list[str], label_block: int = LABEL_BLOCK,
             map_blocks=None) -> DetectionSplit:
    """One split from Step B's chunks (any order): records joined by image id, then the labels, block by block
    (``map_blocks(fn, items)``: how to run them, e.g. as Ray tasks; default one after the other)."""
    from eco_ray.derive.table import assemble_images

    records = DetectionRecords.concat([p["records"] for p in parts])
    _, images = assemble_images(parts)
    if records.image_ids.tolist() != images["image_ids"].tolist():
        raise ValueError("the chunks' records and their image ids disagree")
    n = len(records)
    blocks = [records.take(np.isin(np.arange(n), idx)) for idx in label_blocks(n, label_block)]
    if map_blocks is None:
        results = [block_labels(b, label_block) for b in blocks]
    else:
        results = map_blocks(block_labels, [(b, label_block) for b in blocks])
    labels = {name: np.concatenate([r[name] for r in results]) if results else
              np.zeros((0, len(views), len(records.exits))) for name in QUALITY_MEASURES}
    return DetectionSplit(split, images["image_ids"], list(records.exits), list(views), records,
                          images["gate_features"], images["kinds"], images["num_objects"], labels, label_block)


def split_summary(split: DetectionSplit, tolerance: float) -> dict:
    """Per split: static AP per exit (plain view), the label noise floor, the shallowest sufficient exit."""
    from eco_ray.derive.table import label_summary

    return {"images": len(split), "static": split.static_summaries(), **label_summary(split, tolerance)}
