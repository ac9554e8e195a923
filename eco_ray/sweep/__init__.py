"""Step C at scale: a Ray Tune + Optuna sweep of gates over a derived table, and selection under a budget.

    from eco_ray.sweep import SweepConfig, run_sweep, resume_sweep, select

(Imported lazily: reading a sweep's settings does not import Ray Tune.)
"""

import importlib

_EXPORTS = {"SweepConfig": "eco_ray.sweep.config", "run_sweep": "eco_ray.sweep.driver",
            "resume_sweep": "eco_ray.sweep.driver", "select": "eco_ray.sweep.selection",
            "pick_trial": "eco_ray.sweep.selection", "list_models": "eco_ray.sweep.selection"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'eco_ray.sweep' has no attribute {name!r}")
