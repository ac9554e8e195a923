"""Sweep spaces: YAML files (shipped ones in eco_ray/resources/search_spaces) read into a define-by-run Optuna
space (Ray-free).

Format (one entry per GateConfig field)::

    beta:   {type: float, low: 0.003, high: 1.0, log: true}
    epochs: {type: int, low: 50, high: 600, log: true}
    kind:   {type: categorical, choices: [classify, quality]}
    hidden: {type: categorical, choices: [0, 32], when: {kind: quality}}  # conditional
    cost:   {value: gflops}                                                 # fixed

Parameters are sampled in file order, so a ``when`` may only name a parameter above it; a parameter
whose condition does not hold is not sampled and keeps GateConfig's default.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from eco_ray.config import ConfigError
from eco_ray.gate.config import GateConfig
from eco_ray.resources import resolve_resource

_GATE_FIELDS = {f.name for f in fields(GateConfig)}


def load_space(path: str | Path) -> dict:
    """Read and check a space file (a path, or the name of a shipped space); every problem is a ConfigError
    naming the parameter."""
    path = resolve_resource("search_spaces", path)
    try:
        space = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: expected a mapping of parameter -> spec")
    seen: list[str] = []
    for name, spec in space.items():
        where = f"{path}: parameter {name!r}"
        if name not in _GATE_FIELDS:
            raise ConfigError(f"{where} is not a gate setting; known: {sorted(_GATE_FIELDS)}")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping like {{type: float, low: .., high: ..}}")
        if "value" in spec:
            pass
        elif spec.get("type") in ("float", "int"):
            if "low" not in spec or "high" not in spec or not float(spec["low"]) <= float(spec["high"]):
                raise ConfigError(f"{where}: {spec['type']} needs low <= high")
            if spec.get("log") and float(spec["low"]) <= 0:
                raise ConfigError(f"{where}: a log scale needs low > 0")
        elif spec.get("type") == "categorical":
            if not spec.get("choices"):
                raise ConfigError(f"{where}: categorical needs a non-empty choices list")
        else:
            raise ConfigError(f"{where}: type must be float, int or categorical (or give a fixed value)")
        for dep in (spec.get("when") or {}):
            if dep not in seen:
                raise ConfigError(f"{where}: 'when' names {dep!r}, which is not a parameter above it")
        seen.append(name)
    return space


def define_by_run(trial, space: dict) -> dict:
    """Optuna define-by-run: sample ``space`` on ``trial``; returns the fixed values and the trial number
    (module-level so that Ray Tune can pickle it with functools.partial)."""
    sampled: dict = {}
    fixed: dict = {"optuna_trial": trial.number}
    for name, spec in space.items():
        when = spec.get("when") or {}
        if any(sampled.get(k, fixed.get(k)) != v for k, v in when.items()):
            continue
        if "value" in spec:
            fixed[name] = spec["value"]
        elif spec["type"] == "float":
            sampled[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
        elif spec["type"] == "int":
            sampled[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            sampled[name] = trial.suggest_categorical(name, list(spec["choices"]))
    return fixed
