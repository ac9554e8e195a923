"""Files that ship inside the package, so that an installed wheel works from any directory: model presets
(``models/`` for the segmenter, ``detectors/`` for the detector), sweep spaces (``search_spaces/``), pipeline configs (``pipelines/``) and the Serve config
(``serve/serve_config.yaml``). A setting that names one takes either a path to a file of one's own or the
name of a shipped one (``--config smoke``, ``space: default``, ``--model tiny``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

KINDS = ("models", "detectors", "search_spaces", "pipelines", "serve")


def _folder(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown resource kind {kind!r}")
    return Path(str(resources.files("eco_ray.resources").joinpath(kind)))


def resource_names(kind: str) -> list[str]:
    """The shipped files of a kind, by name (without ``.yaml``)."""
    return sorted(p.name[:-5] for p in _folder(kind).iterdir() if p.name.endswith(".yaml"))


def resource_path(kind: str, name: str) -> Path:
    return _folder(kind) / f"{name}.yaml"


def resolve_resource(kind: str, name_or_path: str | Path) -> Path:
    """A file of one's own if ``name_or_path`` is one, else the shipped resource of that name; a name that is
    neither is a ConfigError listing what ships."""
    from eco_ray.config import ConfigError

    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path)
    name = name[:-5] if name.endswith(".yaml") and "/" not in name else name
    if name in resource_names(kind):
        return resource_path(kind, name)
    raise ConfigError(f"{str(name_or_path)!r} is neither a file nor a shipped {kind.replace('_', ' ')[:-1]} "
                      f"(shipped: {', '.join(resource_names(kind))})")
