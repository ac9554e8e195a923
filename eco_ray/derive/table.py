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

    def with_exits(self, exits: list[int]) -> DerivedSplit:
        """The same images with only ``exits`` (a subset, e.g. the paper's 2..6 of a table that has 0..6)."""
        missing = sorted(set(exits) - set(self.exits))
        if missing:
            raise DerivedDataError(f"exits {missing} are not in the table; it has {self.exits}")
        idx = [self.exits.index(k) for k in exits]
        return DerivedSplit(self.split, self.image_ids, list(exits), self.views, self.stats[:, :, idx],
                            self.gate_features, self.kinds, self.num_objects)

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
            try:
                self._splits[name] = DerivedSplit.from_arrow(name, pq.read_table(path))
            except (KeyError, ValueError, OSError, pa.ArrowException) as e:
                raise DerivedDataError(f"{path} is not a derived table this eco-ray reads ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''}): derive it again") from None
        return self._splits[name]

    @property
    def cost_table(self) -> CostTable:
        return CostTable(self.manifest["costs"])

    def costs(self, measure: str) -> np.ndarray:
        """Per-exit cost (shallow to deep) in the measure's own unit: encoder GFLOPs per image, latency in
        ms per image at batch 1, or encoder layers run."""
        return self.cost_table.measure(measure)

    def cost_columns(self) -> dict[str, np.ndarray]:
        return self.cost_table.columns()

    def static(self, split: str) -> dict[int, dict]:
        """The manifest's static-depth summary of a split, keyed by exit."""
        return {int(k): v for k, v in self.manifest["splits"][split]["static"].items()}


class CostTable:
    """The measured cost of every exit (a derived table's ``costs``, or ``eco-ray cost --json``)."""

    def __init__(self, table: dict):
        self.table = table
        self.rows = table["exits"]

    @property
    def exits(self) -> list[int]:
        return [int(r["exit"]) for r in self.rows]

    @property
    def has_latency(self) -> bool:
        return "latency_ms" in self.rows[0]

    def measure(self, measure: str) -> np.ndarray:
        if measure == "gflops":
            return np.asarray([r["encoder_gflops"] for r in self.rows], np.float64)
        if measure == "latency":
            if not self.has_latency:
                raise DerivedDataError("the cost table has no latency (derived with measure_latency=false): use "
                                       "the gflops cost")
            # a deeper exit runs everything a shallower one runs: a measured latency below the one before it is
            # timing noise (a busy machine), and the decision rule needs costs that never fall with depth
            return np.maximum.accumulate(np.asarray([r["latency_ms"] for r in self.rows], np.float64))
        if measure == "layers":
            return np.asarray([r["exit"] for r in self.rows], np.float64)
        raise DerivedDataError(f"unknown cost measure {measure!r}; known: {list(COST_MEASURES)}")

    def measures(self) -> list[str]:
        """The cost measures this table has."""
        return [m for m in COST_MEASURES if m != "latency" or self.has_latency]

    def columns(self) -> dict[str, np.ndarray]:
        """The costs every evaluation reports (mean and p95): encoder GFLOPs, layers, latency where measured."""
        names = {"gflops": "encoder_gflops", "layers": "layers", "latency": "latency_ms"}
        return {names[m]: self.measure(m) for m in ("gflops", "layers", "latency") if m in self.measures()}

    def full_depth(self) -> dict[str, float]:
        """The deepest exit's cost per budget metric (the reference of a relative budget)."""
        out = {"encoder_gflops": float(self.measure("gflops")[-1])}
        if self.has_latency:
            out["latency_ms"] = float(self.measure("latency")[-1])
        return out

    def per_measure(self) -> dict[str, list[float]]:
        """``{"gflops": [...], "latency": [...], "layers": [...]}``: what a saved gate records."""
        return {m: self.measure(m).tolist() for m in self.measures()}


def relative_costs(costs: np.ndarray) -> np.ndarray:
    """Costs as a fraction of the deepest exit's: the unit beta is expressed in, whatever the measure.

    beta = 0.1 then means: give up 0.1 per-image PQ to save the whole cost of the deepest exit."""
    return np.asarray(costs, np.float64) / float(costs[-1])


def open_derived(ref: str, tracking_uri: str | None = None) -> DerivedDataset:
    """A derived-dataset directory, or the MLflow run (``runs:/<id>`` or a bare run id) that logged one."""
    import re

    if Path(ref).is_dir():
        return DerivedDataset.open(ref)
    if not (ref.startswith("runs:/") or re.fullmatch(r"[0-9a-f]{32}", ref)):
        raise DerivedDataError(f"{ref!r} is neither a derived-dataset directory nor an MLflow run id (runs:/<id>)")
    from eco_ray.tracking import RegistryError, download_run_artifacts

    run_id = ref[len("runs:/"):].split("/")[0] if ref.startswith("runs:/") else ref
    try:
        local = download_run_artifacts(run_id, "derived", tracking_uri)
    except RegistryError as e:
        raise DerivedDataError(f"{ref!r} is neither a derived-dataset directory nor an MLflow run with one ({e})") \
            from None
    return DerivedDataset.open(local)


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
