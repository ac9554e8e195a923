"""One way to configure every stage: typed dataclasses, loaded from YAML, overridden with ``key=value``.

OmegaConf does the merging and type checking; every mistake becomes a :class:`ConfigError` that names
the offending key before any work (or any Ray cluster) starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf

from eco_ray.errors import EcoRayError
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(EcoRayError):
    """A config file, key or value that cannot be used; the message names it."""


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                layers: Sequence[Mapping] = ()) -> T:
    """Build ``schema`` (a dataclass) from its defaults, then ``layers`` (e.g. a preset), then the YAML file,
    then ``key=value`` overrides."""
    try:
        cfg = OmegaConf.structured(schema)
        for layer in layers:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(layer)))
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad config value for {key!r}: {msg}" if key else f"bad config: {msg}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"bad config: {e}") from None
    return obj


def to_yaml(obj) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))
