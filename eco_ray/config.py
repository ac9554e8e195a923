"""One way to configure everything: typed dataclasses, loaded from YAML, overridden with ``key=value``.

OmegaConf does the merging and type checking; every mistake becomes a :class:`ConfigError` that names
the offending key before any work (or any Ray cluster) starts. Configs nest (the pipeline's tree holds each
stage's dataclass), and the same rules hold at any depth:

- a mapping of plain values (e.g. ``data.synth.kind_mix: {clean: 0.5}``) is replaced whole by each source that
  names it, in any form (a YAML mapping, ``kind_mix={...}``, ``kind_mix.clean=1``): the mapping given is the
  mapping used, never silently merged into the default;
- ``renamed`` maps a key that moved to its new place (old files and ``--set`` keys keep working), to a
  message starting with ``!`` saying what replaced it (then the key is refused, naming the new one), or to
  None (a saved file may hold it; it is dropped);
- ``absent`` gives the value of keys that a saved config written before they existed does not name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from eco_ray.errors import EcoRayError

# OmegaConf is imported where configs are loaded, not here: the dataclasses themselves (and the modules that
# only construct them) work without it, e.g. benchmarks/gpu/run.py on a machine without the cluster stack

T = TypeVar("T")


class ConfigError(EcoRayError):
    """A config file, key or value that cannot be used; the message names it."""


def _dataclass_of(hint):
    """The dataclass a field holds (also through ``X | None``), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def mapping_paths(schema, prefix: str = "") -> set[str]:
    """Dotted paths of the settings of ``schema`` (at any depth) that are a mapping of plain values."""
    if not dataclasses.is_dataclass(schema):
        return set()
    out = set()
    for name, hint in typing.get_type_hints(schema).items():
        if typing.get_origin(hint) is dict and typing.get_args(hint)[1:] in ((int,), (float,), (str,), (bool,)):
            out.add(prefix + name)
        elif _dataclass_of(hint) is not None:
            out |= mapping_paths(_dataclass_of(hint), prefix + name + ".")
    return out


def _names(layer, path: str) -> bool:
    from omegaconf import DictConfig

    node = layer
    for part in path.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return True


def _apply_renames(doc: dict, renamed: Mapping[str, str | None], where: str) -> dict:
    """Move (or refuse) renamed keys of a nested mapping; ``where`` names the source in messages."""
    for old, new in renamed.items():
        parts = old.split(".")
        node = doc
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if not isinstance(node, dict) or parts[-1] not in node:
            continue
        if new is None:  # a key that saved files may hold and that no longer means anything here
            node.pop(parts[-1])
            continue
        if new.startswith("!"):
            raise ConfigError(f"{where}: {old!r} is no longer a setting: {new[1:]}")
        value = node.pop(parts[-1])
        target = doc
        for part in new.split(".")[:-1]:
            target = target.setdefault(part, {})
        target[new.split(".")[-1]] = value
    return doc


def _rename_override(item: str, renamed: Mapping[str, str | None]) -> str:
    key, value = item.split("=", 1)
    key = key.strip()
    for old, new in renamed.items():
        if (key == old or key.startswith(old + ".")) and new is not None:
            if new.startswith("!"):
                raise ConfigError(f"--set {key}: {old!r} is no longer a setting: {new[1:]}")
            return f"{new}{key[len(old):]}={value}"
    return item


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                layers: Sequence[Mapping] = (), renamed: Mapping[str, str | None] | None = None,
                absent: Mapping[str, object] | None = None) -> T:
    """Build ``schema`` (a dataclass) from its defaults, then ``layers`` (e.g. a preset), then the YAML file,
    then ``key=value`` overrides; validate it (its ``validate()`` and those of the configs it holds)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    mappings = mapping_paths(schema)
    renamed = renamed or {}
    try:
        cfg = OmegaConf.structured(schema)

        def merge(cfg, layer):
            for name in sorted(p for p in mappings if _names(layer, p)):
                OmegaConf.update(cfg, name, {}, merge=False)
            return OmegaConf.merge(cfg, layer)

        for layer in layers:
            cfg = merge(cfg, OmegaConf.create(dict(layer)))
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            doc = OmegaConf.to_container(OmegaConf.load(path)) or {}
            if not isinstance(doc, dict):
                raise ConfigError(f"{path}: expected a mapping of settings")
            for key, value in (absent or {}).items():
                doc.setdefault(key, value)
            cfg = merge(cfg, OmegaConf.create(_apply_renames(doc, renamed, str(path))))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        reset: set[str] = set()
        for item in (_rename_override(o, renamed) for o in overrides):
            key = item.split("=", 1)[0].strip()
            for name in sorted(mappings):
                if (key == name or key.startswith(name + ".")) and name not in reset:
                    OmegaConf.update(cfg, name, {}, merge=False)  # the first override naming it starts empty
                    reset.add(name)
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad config value for {key!r}: {msg}" if key else f"bad config: {msg}") from None
    try:
        _validate(obj)
    except ValueError as e:
        raise ConfigError(f"bad config: {e}") from None
    return obj


def _validate(obj) -> None:
    """``validate()`` of a config and of every config it holds (sections first)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()


def to_yaml(obj) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def to_dict(obj) -> dict:
    """A config as plain data (nested dataclasses become mappings)."""
    return dataclasses.asdict(obj)


def content_hash(obj) -> str:
    """A short, stable hash of a JSON-able object (configs, dataset descriptions): the stages' input keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
