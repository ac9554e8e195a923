"""The derived dataset of Step B: per image, per view, per exit panoptic statistics, the gate input, and
the measured cost of each exit. Plain data (numpy + Parquet), no Ray, no model.

On disk, one directory::

    manifest.json        schema version, cache key, parent model (URI, version, weights hash), dataset
                         (root, annotation hash per split), views, post-processing thresholds, categories,
                         exits, the cost table, the measured label-noise floor, timings
    <split>.parquet      one row per image, keyed by ``image_id``:
        image_id         int64
        kind             string   (``eco_kind`` of the generated data; "" for other datasets)
        num_objects      int64    (``eco_num_objects``; -1 when unknown)
        gate_features    fixed_size_list<float32>[d]   the pooled gate input (stride-32 tokens after the
                                                       input projection, before any encoder layer)
        iou_sum          fixed_size_list<float64>[V*E*C]   additive panoptic statistics, see
        tp, fp, fn       fixed_size_list<int64>[V*E*C]     eco_ray.metrics.PanopticStats; flattened in
        sem_inter,       fixed_size_list<int64>[V*E*C]     (view, exit, category) order, the shape kept
        sem_union                                          in the schema metadata
                                                           ``eco_ray.stats_shape`` = "V,E,C"

View 0 is always the image as served ("plain"): exact evaluation of any per-image exit choice uses it.
The per-image quality q[i, e] that labels are made of is the per-image PQ averaged over all views, which
lowers the label noise the flip measurement exposes (see ``noise_floor``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eco_ray.errors import EcoRayError
from eco_ray.metrics.panoptic import CategorySet, PanopticStats, per_image_pq, pq_contributions
from eco_ray.metrics.table import stats_from_arrow, stats_to_arrow

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
VIEWS = ("plain", "flip")
QUALITY_MEASURES = ("pq", "dpq")
COST_MEASURES = ("gflops", "latency", "layers")


class DerivedDataError(EcoRayError):
    """A derived-dataset directory that is missing, incomplete or of another schema version."""


@dataclass
class DerivedSplit:
    split: str
    image_ids: np.ndarray  # (N,) int64
    exits: list[int]
    views: list[str]
    stats: PanopticStats  # (N, V, E, C)
    gate_features: np.ndarray  # (N, d) float32
    kinds: np.ndarray  # (N,) str
    num_objects: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def eval_stats(self) -> PanopticStats:
        """(N, E, C): the plain view, which is what a served image gets."""
        return self.stats[:, 0]

    @property
    def quality_per_view(self) -> np.ndarray:
        """(N, V, E) per-image PQ."""
        return per_image_pq(self.stats)

    @property
    def quality(self) -> np.ndarray:
        """(N, E) per-image PQ averaged over the views: the paper's label source."""
        return self.quality_per_view.mean(axis=1)

    def quality_of(self, measure: str = "pq") -> np.ndarray:
        """(N, E) label source: ``pq`` per-image PQ, or ``dpq`` each image's linearised contribution to the
        dataset PQ (eco_ray.metrics.panoptic.pq_contributions, per view around the deepest exit); both
        averaged over the views."""
        if measure == "pq":
            return self.quality
        if measure == "dpq":
            return pq_contributions(self.stats).mean(axis=1)
        raise ValueError(f"quality must be one of {QUALITY_MEASURES}, got {measure!r}")

    def subset(self, mask: np.ndarray, name: str | None = None) -> DerivedSplit:
        return DerivedSplit(name or self.split, self.image_ids[mask], self.exits, self.views, self.stats[mask],
                            self.gate_features[mask], self.kinds[mask], self.num_objects[mask])

    def hold_out(self, fraction: float, seed: int = 0) -> tuple[DerivedSplit, DerivedSplit]:
        """(kept, held out): ``fraction`` of the images, chosen by :func:`held_out_mask` from their ids."""
        mask = held_out_mask(self.image_ids, fraction, seed)
        return self.subset(~mask, f"{self.split}-fit"), self.subset(mask, f"{self.split}-holdout")

    def to_arrow(self) -> pa.Table:
        table = stats_to_arrow(self.image_ids, self.stats)
        d = self.gate_features.shape[1]
        feats = pa.FixedSizeListArray.from_arrays(pa.array(self.gate_features.astype(np.float32).reshape(-1)), d)
        table = table.add_column(1, "kind", pa.array([str(k) for k in self.kinds], pa.string()))
        table = table.add_column(2, "num_objects", pa.array(self.num_objects.astype(np.int64)))
        table = table.add_column(3, "gate_features", feats)
        return table.replace_schema_metadata({**table.schema.metadata, b"eco_ray.exits": json.dumps(self.exits).encode(),
                                              b"eco_ray.views": json.dumps(self.views).encode()})

    @classmethod
    def from_arrow(cls, split: str, table: pa.Table) -> DerivedSplit:
        meta = table.schema.metadata or {}
        ids, stats = stats_from_arrow(table)
        feats = table.column("gate_features").combine_chunks()
        d = feats.type.list_size
        return cls(split, ids.astype(np.int64), json.loads(meta[b"eco_ray.exits"]), json.loads(meta[b"eco_ray.views"]),
                   stats, feats.values.to_numpy(zero_copy_only=False).reshape(len(ids), d).astype(np.float32),
                   np.asarray(table.column("kind").to_pylist(), dtype=object),
                   table.column("num_objects").to_numpy().astype(np.int64))


def held_out_mask(image_ids: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Which images to hold out: a hash of (image id, seed) below ``fraction``. Each image's fate depends on
    its id alone, not on the order or the number of rows, so a larger derived table keeps the same held-out
    images (plus new ones). Raises ValueError unless 0 < fraction < 1 and both parts are non-empty."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    with np.errstate(over="ignore"):  # splitmix64: wrapping uint64 arithmetic is the point
        z = np.asarray(image_ids, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    mask = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction
    if mask.all() or not mask.any():
        raise ValueError(f"holding out {fraction:g} of {len(mask)} images leaves one part empty")
    return mask


def noise_floor(split: DerivedSplit, tolerance: float = 0.02) -> dict:
    """How much per-image PQ moves between two views of the same image at the same exit (needs >= 2 views).

    ``mean_abs_diff`` / ``share_above_tolerance`` / ``sd_diff`` over all (image, exit) pairs, per exit, and
    ``label_sd``: the estimated noise sd of the view-averaged label (sd of one view's noise / sqrt(V))."""
    q = split.quality_per_view  # (N, V, E)
    if q.shape[1] < 2:
        return {"views": q.shape[1], "note": "one view only: noise not measured"}
    diff = q[:, 0] - q[:, 1]  # (N, E)
    per_view_sd = float(diff.std() / np.sqrt(2))  # the difference of two independent noises has sd * sqrt(2)
    return {
        "views": int(q.shape[1]),
        "tolerance": tolerance,
        "mean_abs_diff": float(np.abs(diff).mean()),
        "share_above_tolerance": float((np.abs(diff) > tolerance).mean()),
        "sd_diff": float(diff.std()),
        "label_sd": per_view_sd / float(np.sqrt(q.shape[1])),
        "per_exit": {int(k): {"mean_abs_diff": float(np.abs(diff[:, e]).mean()),
                              "share_above_tolerance": float((np.abs(diff[:, e]) > tolerance).mean())}
                     for e, k in enumerate(split.exits)},
    }


@dataclass
class DerivedDataset:
    """A derived-dataset directory: its manifest and its splits (loaded lazily)."""

    root: Path
    manifest: dict
    _splits: dict[str, DerivedSplit] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path) -> DerivedDataset:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise DerivedDataError(f"{root} is not a derived dataset (no {MANIFEST}); create one with `eco-ray derive`")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DerivedDataError(f"{path}: not valid JSON ({e})") from None
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise DerivedDataError(f"{root} has schema version {manifest.get('schema_version')}, this eco-ray reads "
                                   f"{SCHEMA_VERSION}: derive it again")
        return cls(root, manifest)

    @property
    def exits(self) -> list[int]:
        return list(self.manifest["exits"])

    @property
    def categories(self) -> CategorySet:
        return CategorySet(self.manifest["categories"])

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> DerivedSplit:
        if name not in self._splits:
            if name not in self.manifest["splits"]:
                raise DerivedDataError(f"{self.root} has no split {name!r}; it has {self.split_names}")
            path = self.root / f"{name}.parquet"
            if not path.is_file():
                raise DerivedDataError(f"{path} is missing: the derived dataset is incomplete")
            self._splits[name] = DerivedSplit.from_arrow(name, pq.read_table(path))
        return self._splits[name]

    def costs(self, measure: str) -> np.ndarray:
        """Per-exit cost (shallow to deep) in the measure's own unit: encoder GFLOPs per image, latency in
        ms per image at batch 1, or encoder layers run."""
        return exit_costs(self.manifest["costs"], measure)

    def cost_columns(self) -> dict[str, np.ndarray]:
        """The costs every evaluation reports (mean and p95): encoder GFLOPs, latency (when it was measured),
        layers."""
        cols = {"encoder_gflops": self.costs("gflops"), "layers": self.costs("layers")}
        if "latency_ms" in self.manifest["costs"]["exits"][0]:
            cols["latency_ms"] = self.costs("latency")
        return cols


def exit_costs(cost_table: dict, measure: str) -> np.ndarray:
    rows = cost_table["exits"]
    if measure == "gflops":
        return np.asarray([r["encoder_gflops"] for r in rows], np.float64)
    if measure == "latency":
        if "latency_ms" not in rows[0]:
            raise DerivedDataError("the cost table has no latency (derived with --no-latency): use --cost gflops")
        return np.asarray([r["latency_ms"] for r in rows], np.float64)
    if measure == "layers":
        return np.asarray([r["exit"] for r in rows], np.float64)
    raise DerivedDataError(f"unknown cost measure {measure!r}; known: {list(COST_MEASURES)}")


def relative_costs(costs: np.ndarray) -> np.ndarray:
    """Costs as a fraction of the deepest exit's: the unit beta is expressed in, whatever the measure.

    beta = 0.1 then means: give up 0.1 per-image PQ to save the whole cost of the deepest exit."""
    return np.asarray(costs, np.float64) / float(costs[-1])


def write_split(root: Path, split: DerivedSplit) -> Path:
    path = root / f"{split.split}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(split.to_arrow(), tmp)
    tmp.replace(path)
    return path


def write_manifest(root: Path, manifest: dict) -> Path:
    """Written last, atomically: a directory with a manifest is complete."""
    path = root / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION, **manifest}, indent=2, default=float))
    tmp.replace(path)
    return path
