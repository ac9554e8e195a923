"""MLflow: tracking URIs, experiments, the model registry and resolving model URIs to local directories.

A thin layer: models are logged as artifact directories (safetensors + JSON config, see
eco_ray/model/io.py) and registered as model versions whose source is that directory, so nothing
depends on pickles or on torch.export of a data-dependent early-exit graph.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from eco_ray.errors import EcoRayError

TRACKING_ENV = "MLFLOW_TRACKING_URI"


class RegistryError(EcoRayError):
    """An unknown model, version, alias or run; the message says which."""


def default_tracking_uri(run_dir: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an absolute SQLite store under the run directory."""
    if os.environ.get(TRACKING_ENV):
        return os.environ[TRACKING_ENV]
    path = Path(run_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def ensure_experiment(name: str, run_dir: str | Path, tracking_uri: str) -> str:
    """The experiment's id; created with an absolute artifact location under the run directory when the
    store is local (a relative one would resolve differently in every process)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not tracking_uri.startswith(("http://", "https://", "databricks")):
        location = (Path(run_dir).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def register_directory(client: MlflowClient, name: str, run_id: str, artifact_path: str, tags: dict[str, str],
                       description: str = "") -> str:
    """Register ``runs:/run_id/artifact_path`` as a new version of ``name``; returns the version."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:
            pass  # created meanwhile
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    return version.version


def resolve_model_dir(uri: str, tracking_uri: str) -> Path:
    """``models:/name@alias``, ``models:/name/version`` (or ``/latest``), ``runs:/id/path``, or a local directory -> a
    local directory holding the model files (downloaded from the artifact store when remote)."""
    if Path(uri).is_dir():
        return Path(uri)
    if uri.startswith("models:/"):
        source = registry_version(uri, tracking_uri).source
    elif uri.startswith("runs:/"):
        source = uri
    else:
        raise RegistryError(f"{uri!r} is not a models:/ or runs:/ URI nor a local directory")
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri))
    except (MlflowException, OSError) as e:
        raise RegistryError(f"cannot download {uri} ({source}): {str(e).splitlines()[0]}") from None


def registry_version(uri: str, tracking_uri: str):
    """The ModelVersion a ``models:/name@alias``, ``models:/name/N`` or ``models:/name/latest`` URI points at
    now (``latest``: the highest version number)."""
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


def flat_params(obj, prefix: str = "") -> dict[str, str]:
    """A nested dict flattened to ``a.b.c`` keys with string values (MLflow params)."""
    out: dict[str, str] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def content_hash(obj) -> str:
    """A short, stable hash of a JSON-able object (configs, dataset descriptions)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
