"""One way to configure every stage: typed dataclasses, loaded from YAML, overridden with ``key=value``.

OmegaConf does the merging and type checking; every mistake becomes a :class:`ConfigError` that names
the offending key before any work (or any Ray cluster) starts.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf

from eco_ray.errors import EcoRayError
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(EcoRayError):
    """A config file, key or value that cannot be used; the message names it."""


def _mapping_fields(schema) -> set[str]:
    """Top-level settings of ``schema`` that are a mapping of plain values (e.g. SynthConfig.kind_mix:
    dict[str, float]); not the free-form sections of a config of configs (PipelineConfig.train: dict[str, Any])."""
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    return {name for name, hint in hints.items()
            if typing.get_origin(hint) is dict and typing.get_args(hint)[1:] in ((int,), (float,), (str,), (bool,))}


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                layers: Sequence[Mapping] = ()) -> T:
    """Build ``schema`` (a dataclass) from its defaults, then ``layers`` (e.g. a preset), then the YAML file,
    then ``key=value`` overrides.

    A mapping-typed setting is replaced whole by each source that names it, in any form
    (``kind_mix={clean: 1}``, ``kind_mix.clean=1``, or a YAML mapping): the mapping given is the mapping
    used, never silently merged into the default (a mix that kept a default kind surprised us once)."""
    mappings = _mapping_fields(schema)
    try:
        cfg = OmegaConf.structured(schema)

        def merge(cfg, layer):
            for name in mappings & set(layer.keys()):
                OmegaConf.update(cfg, name, {}, merge=False)
            return OmegaConf.merge(cfg, layer)

        for layer in layers:
            cfg = merge(cfg, OmegaConf.create(dict(layer)))
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            cfg = merge(cfg, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        reset: set[str] = set()
        for item in overrides:
            name = item.split("=", 1)[0].strip().split(".")[0]
            if name in mappings and name not in reset:  # the first override naming it starts from empty
                OmegaConf.update(cfg, name, {}, merge=False)
                reset.add(name)
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
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
