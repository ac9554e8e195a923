"""The derived dataset of Step B: per image, per view, per exit panoptic statistics, the gate input, and
the measured cost of each exit. Plain data (numpy + Arrow), no Ray, no model.

On disk, one directory (schema version 2)::

    manifest.json          schema version, cache key, parent model (URI, version, weights hash), dataset
                           (root, annotation hash per split), views, post-processing thresholds, categories,
                           exits, the cost table, the measured label-noise floor, timings
    <split>.images.arrow   one row per image (Arrow IPC file, uncompressed), keyed by ``image_id``:
        image_id           int64
        kind               string   (``eco_kind`` of the generated data; "" for other datasets)
        num_objects        int64    (``eco_num_objects``; -1 when unknown)
        entries            int32    how many rows of <split>.stats.arrow are this image's (in image order)
        gate_features      fixed_size_list<float32>[d]   the pooled gate input (stride-32 tokens after the
                                                         input projection, before any encoder layer)
    <split>.stats.arrow    one row per (image, category) that is non-zero at some view and exit
                           (eco_ray.metrics.sparse.SparseStats, Arrow IPC file, uncompressed):
        category           int32    index into the manifest's categories
        iou_sum            fixed_size_list<float64>[V*E]   additive panoptic statistics (see
        tp, fp, fn,        fixed_size_list<int32>[V*E]     eco_ray.metrics.PanopticStats), flattened in
        sem_inter,                                         (view, exit) order; int64 where a value does
        sem_union                                          not fit int32; shape in the schema metadata

The Arrow files are memory-mapped when opened: the arrays are read-only numpy views of the page cache, so
every process on a node that opens the table (sweep trials, the verdict) shares one copy. Tables of schema
version 1 (``<split>.parquet``, dense (image, view, exit, category) lists) are still read, into the same
sparse form; :func:`migrate` rewrites one as version 2.

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

from eco_ray.derive import _detection
from eco_ray.errors import EcoRayError
from eco_ray.metrics.panoptic import CategorySet, PanopticStats, per_image_pq, pq_contributions
from eco_ray.metrics.sparse import STAT_NAMES, SparseStats
from eco_ray.metrics.table import stats_from_arrow

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
    stats: SparseStats  # (N, V, E, C); dense PanopticStats are converted
    gate_features: np.ndarray  # (N, d) float32
    kinds: np.ndarray  # (N,) str
    num_objects: np.ndarray  # (N,) int64
    _cache: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    task = "panoptic"
    metric = "pq"
    measures = QUALITY_MEASURES  # the label sources quality_of takes

    def __setattr__(self, name, value):
        if name == "stats":  # dense statistics are stored sparse; whatever was cached from the old ones goes
            value = SparseStats.from_dense(value) if isinstance(value, PanopticStats) else value
            self.__dict__.get("_cache", {}).clear()
        super().__setattr__(name, value)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def eval_stats(self) -> SparseStats:
        """(N, E, C): the plain view, which is what a served image gets (views of the arrays, kept)."""
        if "eval" not in self._cache:
            self._cache["eval"] = self.stats.inner(0)
        return self._cache["eval"]

    def operating_point(self, choice: np.ndarray, categories: CategorySet, costs: dict):
        """The exact PQ (and parts), costs and exit histogram of a per-image choice of exit indices."""
        from eco_ray.tradeoff import evaluate_assignment

        return evaluate_assignment(self.eval_stats, choice, categories, costs, self.exits)

    def dense_stats(self) -> PanopticStats:
        """(N, V, E, C) as dense arrays: for small tables and tests (COCO-sized tables do not fit)."""
        return self.stats.to_dense()

    @property
    def quality_per_view(self) -> np.ndarray:
        """(N, V, E) per-image PQ (computed once per split)."""
        if "pq" not in self._cache:
            self._cache["pq"] = self.stats.per_image(per_image_pq)
        return self._cache["pq"]

    @property
    def quality(self) -> np.ndarray:
        """(N, E) per-image PQ averaged over the views: the paper's label source."""
        return self.quality_per_view.mean(axis=1)

    def quality_of(self, measure: str | None = "pq") -> np.ndarray:
        """(N, E) label source: ``pq`` per-image PQ (the default, also for None), or ``dpq`` each image's
        linearised contribution to the dataset PQ (eco_ray.metrics.panoptic.pq_contributions, per view around
        the deepest exit, over this split's images); both averaged over the views."""
        if measure in ("pq", None):
            return self.quality
        if measure == "dpq":
            if "dpq" not in self._cache:
                totals = self.stats.totals()  # (V, E, C), summed over this split's images
                self._cache["dpq"] = self.stats.per_image(
                    lambda block: pq_contributions(block, totals=totals, images=len(self))).mean(axis=1)
            return self._cache["dpq"]
        raise ValueError(f"quality must be one of {QUALITY_MEASURES} for a panoptic table, got {measure!r}")

    def subset(self, mask: np.ndarray, name: str | None = None) -> DerivedSplit:
        out = DerivedSplit(name or self.split, self.image_ids[mask], self.exits, self.views, self.stats.take(mask),
                           self.gate_features[mask], self.kinds[mask], self.num_objects[mask])
        if "pq" in self._cache:  # per image: the rows of the whole split's
            out._cache["pq"] = self._cache["pq"][mask]
        return out

    def with_exits(self, exits: list[int]) -> DerivedSplit:
        """The same images with only ``exits`` (a subset, e.g. the paper's 2..6 of a table that has 0..6)."""
        missing = sorted(set(exits) - set(self.exits))
        if missing:
            raise DerivedDataError(f"exits {missing} are not in the table; it has {self.exits}")
        idx = [self.exits.index(k) for k in exits]
        out = DerivedSplit(self.split, self.image_ids, list(exits), self.views, self.stats.inner((slice(None), idx)),
                           self.gate_features, self.kinds, self.num_objects)
        if "pq" in self._cache:
            out._cache["pq"] = self._cache["pq"][..., idx]
        return out

    def hold_out(self, fraction: float, seed: int = 0) -> tuple[DerivedSplit, DerivedSplit]:
        """(kept, held out): ``fraction`` of the images, chosen by :func:`held_out_mask` from their ids."""
        mask = held_out_mask(self.image_ids, fraction, seed)
        return self.subset(~mask, f"{self.split}-fit"), self.subset(mask, f"{self.split}-holdout")

    # ------------------------------------------------------------------ storage
    def images_arrow(self) -> pa.Table:
        return images_table(self.image_ids, self.kinds, self.num_objects, self.gate_features, self.exits, self.views,
                            {"entries": pa.array(np.diff(self.stats.offsets).astype(np.int32))})

    def stats_arrow(self) -> pa.Table:
        s = self.stats
        cells = int(np.prod(s.inner_shape))
        columns = {"category": pa.array(s.category.astype(np.int32))}
        for name in STAT_NAMES:
            v = np.ascontiguousarray(s.values[name]).reshape(-1)
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(v), cells)
        meta = {b"eco_ray.stats_shape": ",".join(map(str, s.inner_shape)).encode(),
                b"eco_ray.num_categories": str(s.num_categories).encode()}
        return pa.table(columns).replace_schema_metadata(meta)

    def tables(self) -> dict[str, pa.Table]:
        return {"images": self.images_arrow(), "stats": self.stats_arrow()}

    @classmethod
    def from_tables(cls, split: str, tables: dict[str, pa.Table]) -> DerivedSplit:
        return cls.from_arrow(split, tables["images"], tables["stats"])

    @classmethod
    def from_arrow(cls, split: str, images: pa.Table, stats: pa.Table) -> DerivedSplit:
        meta, smeta = images.schema.metadata or {}, stats.schema.metadata or {}
        n = images.num_rows
        inner = tuple(int(x) for x in smeta[b"eco_ray.stats_shape"].decode().split(","))
        offsets = np.zeros(n + 1, np.int64)
        offsets[1:] = np.cumsum(column(images, "entries"), dtype=np.int64)
        values = {name: column(stats, name).reshape((stats.num_rows, *inner)) for name in STAT_NAMES}
        sparse = SparseStats(offsets, column(stats, "category"), values, int(smeta[b"eco_ray.num_categories"]))
        d = images.schema.field("gate_features").type.list_size
        return cls(split, column(images, "image_id"), json.loads(meta[b"eco_ray.exits"]),
                   json.loads(meta[b"eco_ray.views"]), sparse, column(images, "gate_features").reshape(n, d),
                   np.asarray(images.column("kind").to_pylist(), dtype=object), column(images, "num_objects"))

    @classmethod
    def from_parquet_v1(cls, split: str, table: pa.Table) -> DerivedSplit:
        """A schema-1 table (dense statistics per image row), converted to the sparse form."""
        meta = table.schema.metadata or {}
        ids, stats = stats_from_arrow(table)
        feats = table.column("gate_features").combine_chunks()
        d = feats.type.list_size
        return cls(split, ids.astype(np.int64), json.loads(meta[b"eco_ray.exits"]), json.loads(meta[b"eco_ray.views"]),
                   stats, feats.values.to_numpy(zero_copy_only=False).reshape(len(ids), d).astype(np.float32),
                   np.asarray(table.column("kind").to_pylist(), dtype=object),
                   table.column("num_objects").to_numpy().astype(np.int64))


def images_table(image_ids: np.ndarray, kinds: np.ndarray, num_objects: np.ndarray, gate_features: np.ndarray,
                 exits: list[int], views: list[str], extra: dict[str, pa.Array],
                 metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    """A split's one row per image: id, kind, objects, the gate input, and the task's ``extra`` columns."""
    d = gate_features.shape[1]
    feats = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(gate_features, np.float32).reshape(-1)), d)
    meta = {b"eco_ray.exits": json.dumps(list(exits)).encode(), b"eco_ray.views": json.dumps(list(views)).encode(),
            **(metadata or {})}
    columns = {"image_id": pa.array(np.asarray(image_ids).astype(np.int64)),
               "kind": pa.array([str(k) for k in kinds], pa.string()),
               "num_objects": pa.array(np.asarray(num_objects).astype(np.int64)), **extra, "gate_features": feats}
    return pa.table(columns).replace_schema_metadata(meta)


def assemble_images(parts: list[dict]) -> tuple[np.ndarray, dict]:
    """Step B's chunks (any order) joined by image id: (the order that sorts the chunks' rows by id, the image
    columns in that order: ``image_ids``, ``gate_features``, ``kinds``, ``num_objects``)."""
    ids = np.concatenate([p["image_ids"] for p in parts])
    order = np.argsort(ids, kind="stable")
    return order, {"image_ids": ids[order].astype(np.int64),
                   "gate_features": np.concatenate([p["gate_features"] for p in parts])[order].astype(np.float32),
                   "kinds": np.asarray(sum((p["kinds"] for p in parts), []), dtype=object)[order],
                   "num_objects": np.asarray(sum((p["num_objects"] for p in parts), []), dtype=np.int64)[order]}


def column(table: pa.Table, name: str) -> np.ndarray:
    """A column as a numpy array: a zero-copy view of the (memory-mapped) buffer where Arrow allows it;
    fixed-size lists flattened."""
    col = table.column(name)
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


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


def label_summary(split, tolerance: float) -> dict:
    """What a split's labels say, whatever the task: the noise floor, each image's shallowest sufficient exit
    (overall and per kind), the mean label per exit."""
    from eco_ray.tradeoff import shallowest_sufficient

    suff = shallowest_sufficient(split.quality, tolerance)
    hist = {int(k): int((suff == e).sum()) for e, k in enumerate(split.exits)}
    by_kind = {}
    for kind in sorted(set(split.kinds.tolist()) - {""}):
        sel = split.kinds == kind
        by_kind[kind] = {int(k): int((suff[sel] == e).sum()) for e, k in enumerate(split.exits)}
    return {"noise_floor": noise_floor(split, tolerance), "sufficient_exit_histogram": hist,
            "sufficient_exit_histogram_by_kind": by_kind,
            "quality_mean_per_exit": {int(k): float(split.quality[:, e].mean()) for e, k in enumerate(split.exits)}}


def split_summary(split: DerivedSplit, categories, tolerance: float) -> dict:
    """Per split: static PQ per exit (plain view), the noise floor, the shallowest sufficient exit."""
    from eco_ray.metrics.panoptic import aggregate

    totals = split.eval_stats.totals()  # (E, C)
    static = {int(k): aggregate(totals[e], categories).summary() for e, k in enumerate(split.exits)}
    return {"images": len(split), "static": static, **label_summary(split, tolerance)}


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
        if manifest.get("schema_version") not in READABLE_VERSIONS:
            raise DerivedDataError(f"{root} has schema version {manifest.get('schema_version')}, this eco-ray reads "
                                   f"{list(READABLE_VERSIONS)}: derive it again")
        return cls(root, manifest)

    @property
    def exits(self) -> list[int]:
        return list(self.manifest["exits"])

    @property
    def task(self) -> str:
        """``panoptic`` or ``detection`` (a table written before detection names none: panoptic)."""
        return self.manifest.get("task", "panoptic")

    @property
    def metric(self) -> str:
        """The dataset metric its evaluations report: ``pq``, or ``ap`` for a detector's table."""
        return self.split_type.metric

    @property
    def split_type(self):
        """The class of its splits: DerivedSplit, or DetectionSplit for a detector's table."""
        return _split_type(self.task)

    @property
    def categories(self) -> CategorySet:
        # a detector's categories are COCO instance categories, all things
        return CategorySet([{**c, "isthing": c.get("isthing", 1)} for c in self.manifest["categories"]])

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> DerivedSplit:
        if name not in self._splits:
            if name not in self.manifest["splits"]:
                raise DerivedDataError(f"{self.root} has no split {name!r}; it has {self.split_names}")
            self._splits[name] = read_split(self.root, name, self.manifest["schema_version"], self.task)
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


TASK_TABLES = {"panoptic": ("images", "stats"), "detection": _detection.TABLES}


def _split_type(task: str):
    if task not in TASK_TABLES:
        raise DerivedDataError(f"a derived table of unknown task {task!r} (known: {', '.join(TASK_TABLES)})")
    return DerivedSplit if task == "panoptic" else _detection.DetectionSplit


def split_files(root: Path, name: str, version: int = SCHEMA_VERSION, task: str = "panoptic") -> list[Path]:
    if version == 1:
        return [root / f"{name}.parquet"]
    return [root / f"{name}.{table}.arrow" for table in TASK_TABLES[task]]


def read_split(root: Path, name: str, version: int = SCHEMA_VERSION, task: str = "panoptic"):
    """The split ``name`` of the table at ``root``: a DerivedSplit (panoptic) or a DetectionSplit."""
    split_type = _split_type(task)
    paths = split_files(root, name, version, task)
    for path in paths:
        if not path.is_file():
            raise DerivedDataError(f"{path} is missing: the derived dataset is incomplete")
    path = paths[0]
    try:
        if version == 1:
            return DerivedSplit.from_parquet_v1(name, pq.read_table(path))
        tables = {}
        for table, path in zip(TASK_TABLES[task], paths):
            tables[table] = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        path = root / f"{name}.*.arrow"  # a failure past here is of the set
        return split_type.from_tables(name, tables)
    except (KeyError, ValueError, OSError, pa.ArrowException) as e:
        raise DerivedDataError(f"{path} is not a derived table this eco-ray reads ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}): derive it again") from None


def write_split(root: Path, split) -> list[Path]:
    """Every Arrow file of a split, each written whole to a temporary name and renamed."""
    paths = []
    for table_name, table in split.tables().items():
        path = Path(root) / f"{split.split}.{table_name}.arrow"
        tmp = path.with_suffix(".arrow.tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(table.num_rows, 1))
        tmp.replace(path)
        paths.append(path)
    return paths


def migrate(root: str | Path) -> bool:
    """Rewrite a schema-1 derived dataset as schema 2 in place (the split files first, the manifest last; the
    old Parquet files removed after). False when it already is schema 2."""
    ds = DerivedDataset.open(root)
    if ds.manifest["schema_version"] == SCHEMA_VERSION:
        return False
    for name in ds.split_names:
        write_split(ds.root, ds.split(name))
    write_manifest(ds.root, {k: v for k, v in ds.manifest.items() if k != "schema_version"})
    for name in ds.split_names:
        split_files(ds.root, name, 1)[0].unlink(missing_ok=True)
    return True


def write_manifest(root: Path, manifest: dict) -> Path:
    """Written last, atomically: a directory with a manifest is complete."""
    path = root / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION, **manifest}, indent=2, default=float))
    tmp.replace(path)
    return path
