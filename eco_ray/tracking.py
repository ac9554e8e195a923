"""The one MLflow layer: tracking URIs, experiments, stage runs, params, the tag schema, the model registry.

Every stage logs through it, so the tag schema has one owner: a stage run carries ``eco_ray.stage`` and the
keys that link it to what it was made from (``derived_key``, ``parent_uri``, ``parent_version``, ...), and
``eco-ray select`` finds a sweep by the tags a sweep run was written with here.

Models are logged as artifact directories (safetensors + JSON config, eco_ray/model/io.py) and registered as
versions whose source is that directory; nothing depends on pickles or on torch.export of a data-dependent
early-exit graph. Registration is idempotent: a version carries a token (by default the source run and
path), and registering the same token again returns the existing version, so a job killed between
"register" and "move the alias" leaves no orphan and its resume no duplicate.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from eco_ray.errors import EcoRayError

TRACKING_ENV = "MLFLOW_TRACKING_URI"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
MAX_BATCH = 900  # metrics per log_batch call (MLflow allows 1000)


class RegistryError(EcoRayError):
    """An unknown model, version, alias or run; the message says which."""


class Stage:
    """Values of the ``eco_ray.stage`` tag."""

    TRAIN, DERIVE, GATE, SWEEP, SWEEP_TRIAL = "train", "derive", "gate", "sweep", "sweep-trial"


class Tag:
    """The tag schema of eco-ray's runs and model versions."""

    STAGE = "eco_ray.stage"
    TOKEN = "eco_ray.token"  # registration idempotency
    PARENT_RUN = "mlflow.parentRunId"
    SWEEP = "sweep"
    TRIAL = "optuna_trial"
    FEASIBLE = "feasible"
    ERROR = "error"
    STUDY = "study_name"
    DERIVED_KEY = "derived_key"
    DERIVED_RUN_ID = "derived_run_id"
    DERIVED_PATH = "derived_path"
    PARENT_URI = "parent_uri"
    PARENT_VERSION = "parent_version"
    PARENT_RUN_ID = "parent_run_id"
    GATE_KIND = "gate_kind"
    COST = "cost"
    DATA_HASH = "data_hash"
    CONFIG_HASH = "config_hash"


def default_tracking_uri(run_dir: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an absolute SQLite store under the run directory."""
    if os.environ.get(TRACKING_ENV):
        return os.environ[TRACKING_ENV]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def parent_links(parent: Mapping) -> dict[str, str]:
    """The tags that link a run to the parent model it used (a derived table's ``parent`` entry)."""
    return {Tag.PARENT_URI: str(parent.get("uri", "")), Tag.PARENT_VERSION: str(parent.get("version", "")),
            Tag.PARENT_RUN_ID: str(parent.get("run_id", ""))}


def flat_params(obj: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested mapping flattened to ``a.b.c`` keys with string values (MLflow params)."""
    out: dict[str, str] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class Tracker:
    """MLflow for one tracking URI (and, for a local store, the run directory its artifacts live under)."""

    def __init__(self, tracking_uri: str, run_dir: str | Path | None = None, experiment: str = "eco-ray"):
        from mlflow import MlflowClient

        self.uri, self.experiment = tracking_uri, experiment
        self.run_dir = Path(run_dir).resolve() if run_dir is not None else None
        if tracking_uri.startswith("sqlite:///"):  # SQLite needs its directory before the first connection
            Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri)
        self._experiment_id: str | None = None

    @classmethod
    def of(cls, ctx) -> Tracker:
        """The tracker of a RunContext."""
        return cls(ctx.tracking_uri, ctx.run_dir, ctx.experiment)

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith(("http://", "https://", "databricks"))

    # ------------------------------------------------------------------------------------------- runs
    @property
    def experiment_id(self) -> str:
        """Created on first use, with an absolute artifact location under the run directory when the store
        is local (a relative one would resolve differently in every process)."""
        from mlflow.exceptions import MlflowException

        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                self._experiment_id = exp.experiment_id
            else:
                location = (self.run_dir / "mlartifacts").as_uri() if self.is_local and self.run_dir else None
                try:
                    self._experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
                except MlflowException:  # created meanwhile by another process
                    self._experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
        return self._experiment_id

    def start_run(self, stage: str, name: str, tags: Mapping | None = None, params: Mapping | None = None,
                  parent_run_id: str | None = None) -> str:
        all_tags = {Tag.STAGE: stage, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_run_id:
            all_tags[Tag.PARENT_RUN] = parent_run_id
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    @contextlib.contextmanager
    def run(self, stage: str, name: str, tags: Mapping | None = None, params: Mapping | None = None,
            parent_run_id: str | None = None) -> Iterator[str]:
        """A stage run that ends FINISHED, or FAILED when the block raises."""
        run_id = self.start_run(stage, name, tags, params, parent_run_id)
        try:
            yield run_id
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping) -> None:
        """Nested params flattened (``a.b``) and cut to MLflow's length limit, in batches."""
        from mlflow.entities import Param

        items = [Param(k, v[:MAX_PARAM_LENGTH]) for k, v in flat_params(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float] | Iterable[tuple[str, float, int]],
                    step: int = 0) -> None:
        """A mapping (all at ``step``) or (key, value, step) triples, in batches MLflow accepts."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        triples = [(k, v, step) for k, v in metrics.items()] if isinstance(metrics, Mapping) else list(metrics)
        items = [Metric(k, float(v), now, int(s)) for k, v, s in triples]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + MAX_BATCH])

    def set_tags(self, run_id: str, tags: Mapping) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_path)

    def child_runs(self, parent_run_id: str, finished_only: bool = False) -> list:
        query = f"tags.`{Tag.PARENT_RUN}` = '{parent_run_id}'"
        if finished_only:
            query += " and attributes.status = 'FINISHED'"
        experiment = self.client.get_run(parent_run_id).info.experiment_id
        return self.client.search_runs([experiment], query, max_results=50000)

    def find_sweep_run(self, sweep: str):
        """The parent run of the sweep named ``sweep``, searched in every experiment; None if there is none."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        found = self.client.search_runs(experiments, f"tags.{Tag.SWEEP} = '{sweep}' and tags.`{Tag.STAGE}` = "
                                                     f"'{Stage.SWEEP}'", max_results=1)
        return found[0] if found else None

    # --------------------------------------------------------------------------------------- registry
    def register(self, name: str, run_id: str, artifact_path: str, tags: Mapping, description: str = "",
                 token: str | None = None) -> int | str:
        """Register ``runs:/run_id/artifact_path`` as a version of ``name``; returns the version (as the store
        reports versions: an int from a local store, a string over HTTP). Registering the same ``token`` (default:
        the run and path) again returns the version registered the first time."""
        from mlflow.exceptions import MlflowException

        token = token or f"{run_id}/{artifact_path}"
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(name, description=description)
            except MlflowException:
                pass  # created meanwhile
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        default_token = token == f"{run_id}/{artifact_path}"
        for v in self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            tagged = dict(v.tags).get(Tag.TOKEN)
            # versions registered before tokens existed are the same registration when their source is the same
            if tagged == token or (tagged is None and default_token and v.source == source):
                return v.version
        version = self.client.create_model_version(
            name, source, run_id=run_id, tags={**{k: str(v) for k, v in tags.items()}, Tag.TOKEN: token})
        return version.version

    def set_alias(self, name: str, alias: str, version: int | str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_registered_model_alias(name, alias, version)
        except MlflowException as e:
            raise RegistryError(f"registered {name} version {version} but could not move alias {alias!r}: "
                                f"{str(e).splitlines()[0]}") from None

    def run_data(self, run_id: str):
        """A run's params and tags (``.params``, ``.tags``)."""
        return self.client.get_run(run_id).data

    def registered_versions(self, names: tuple[str, ...]) -> list[dict]:
        """Every version of the registered models ``names`` with its aliases and tags, oldest first."""
        from mlflow.exceptions import MlflowException

        out = []
        for name in names:
            try:
                model = self.client.get_registered_model(name)
            except MlflowException:
                continue
            aliases: dict[str, list[str]] = {}
            for alias, version in (model.aliases or {}).items():
                aliases.setdefault(str(version), []).append(alias)
            for v in sorted(self.client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
                out.append({"name": name, "version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                            "run_id": v.run_id, "created": v.creation_timestamp, "tags": dict(v.tags)})
        return out

    def alias_version(self, name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None


CACHE_ENV = "ECO_RAY_CACHE_DIR"
_COMPLETE = ".eco-ray-complete"  # written last into a finished download; holds the artifact's relative path
STALE_PARTIAL_S = 6 * 3600  # an unfinished download older than this was killed


def cache_dir() -> Path:
    """Where remote artifacts are downloaded: $ECO_RAY_CACHE_DIR, else $XDG_CACHE_HOME/eco-ray or ~/.cache/eco-ray."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eco-ray"


def download_artifact(artifact_uri: str, tracking_uri: str | None) -> Path:
    """A local path holding ``artifact_uri``. A local store's files are returned in place; a remote one's
    (``mlflow-artifacts:``, ``s3://``, ...) are downloaded once into the cache, keyed by the store and URI, so
    every replica start and every resolve of the same version reuses one copy instead of leaving a new temp
    dir behind. The download lands in a temp dir beside its cache entry and is renamed into place when whole:
    a killed download leaves no entry that looks complete. Entries are kept (a registered version's files do
    not change): remove the cache directory to reclaim the space."""
    import hashlib
    import shutil
    import tempfile
    from urllib.parse import urlparse

    import mlflow

    scheme = urlparse(artifact_uri).scheme
    if scheme in ("", "file"):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, tracking_uri=tracking_uri))
    entry = cache_dir() / "artifacts" / hashlib.sha256(f"{tracking_uri}\n{artifact_uri}".encode()).hexdigest()[:32]
    if (entry / _COMPLETE).is_file():
        return entry / (entry / _COMPLETE).read_text()
    entry.parent.mkdir(parents=True, exist_ok=True)
    for stale in entry.parent.glob(".partial-*"):  # left by a killed download (a live one is younger)
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(partial),
                                                         tracking_uri=tracking_uri))
        (partial / _COMPLETE).write_text(str(local.relative_to(partial)))
        with contextlib.suppress(OSError):  # a concurrent download of the same URI may have won: use its copy
            os.replace(partial, entry)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return entry / (entry / _COMPLETE).read_text()


def download_run_artifacts(run_id: str, artifact_path: str, tracking_uri: str | None) -> Path:
    """A run's artifact directory as a local path (see download_artifact); a RegistryError when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        root = MlflowClient(tracking_uri).get_run(run_id).info.artifact_uri
        return download_artifact(f"{root.rstrip('/')}/{artifact_path}", tracking_uri)
    except (MlflowException, OSError) as e:
        raise RegistryError(f"run {run_id!r} has no artifacts {artifact_path!r} ({str(e).splitlines()[0]})") from None


# ----------------------------------------------------------------------------------------- model URIs
def resolve_model_dir(uri: str, tracking_uri: str) -> Path:
    """``models:/name@alias``, ``models:/name/version`` (or ``/latest``), ``runs:/id/path``, or a local directory -> a
    local directory holding the model files (from the download cache when the store is remote)."""
    from mlflow.exceptions import MlflowException

    if Path(uri).is_dir():
        return Path(uri)
    if uri.startswith("models:/"):
        source = registry_version(uri, tracking_uri).source
    elif uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        return download_run_artifacts(run_id, path, tracking_uri)
    else:
        raise RegistryError(f"{uri!r} is not a models:/ or runs:/ URI nor a local directory")
    try:
        return download_artifact(source, tracking_uri)
    except (MlflowException, OSError) as e:
        raise RegistryError(f"cannot download {uri} ({source}): {str(e).splitlines()[0]}") from None


def registry_version(uri: str, tracking_uri: str):
    """The ModelVersion a ``models:/name@alias``, ``models:/name/N`` or ``models:/name/latest`` URI points at
    now (``latest``: the highest version number)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    rest = uri[len("models:/"):]
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, number = rest.rsplit("/", 1)
        if number != "latest":
            return client.get_model_version(name, number)
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise ValueError(f"registered model {name!r} has no versions (or does not exist)")
        return max(versions, key=lambda v: int(v.version))
    except (MlflowException, ValueError) as e:
        raise RegistryError(f"cannot resolve {uri}: {str(e).splitlines()[0]}") from None


def describe_model_uri(uri: str, tracking_uri: str) -> dict:
    """What a model URI points at: ``{"uri", "name", "version", "run_id"}`` for registry URIs (the
    version an alias points at *now*), ``{"uri", "run_id"}`` for runs:/, ``{"uri"}`` for a directory."""
    if uri.startswith("models:/"):
        v = registry_version(uri, tracking_uri)
        return {"uri": uri, "name": v.name, "version": str(v.version), "run_id": v.run_id}
    if uri.startswith("runs:/"):
        return {"uri": uri, "run_id": uri[len("runs:/"):].split("/", 1)[0]}
    return {"uri": str(Path(uri).resolve())}
