"""One sweep trial, Ray-free: a gate fit and its exact evaluation from the derived table (seconds)."""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

from eco_ray.config import load_config
from eco_ray.files import write_json
from eco_ray.gate.config import GateConfig
from eco_ray.results import METRICS

_TABLES: dict = {}
TRIAL_ERROR = "trial_error"  # the key of a failed trial's reported result: its error, in one line


def open_table(path: str):
    """Trial actors are reused: read the derived table once per process."""
    from eco_ray.derive.table import DerivedDataset

    if path not in _TABLES:
        _TABLES.clear()
        _TABLES[path] = DerivedDataset.open(path)
    return _TABLES[path]


def trial_dir(sweep_dir: str | Path, number: int) -> Path:
    return Path(sweep_dir) / "trials" / f"{number:05d}"


def run_trial(config: dict, derived: str, sweep_dir: str, train_split: str, eval_split: str,
              holdout: float = 0.0) -> dict:
    """Fit + exact evaluation, the gate saved under the sweep directory; returns the finite metrics Tune
    reports: the selection metrics (on the held-out training images, or on the eval split when ``holdout``
    is 0) under their plain names, the eval split's under ``val_<name>``."""
    from eco_ray.gate.evaluate import fit_and_evaluate
    from eco_ray.gate.run import gate_record
    from eco_ray.model.io import save_gate

    params = {k: v for k, v in config.items() if k != "optuna_trial"}
    number = int(config["optuna_trial"])
    cfg = load_config(GateConfig, layers=[params])
    ds = open_table(derived)
    fit = fit_and_evaluate(ds, cfg, [cfg.beta], train_split, eval_split, holdout=holdout)
    evaluation = fit.evaluations[0]
    table = ds.cost_table
    worst = {"encoder_gflops": float(table.measure("gflops")[-1]), "layers": float(ds.exits[-1]),
             "latency_ms": float(table.measure("latency")[-1]) if table.has_latency else 0.0}

    def finite(point) -> dict:
        out = {}
        for key in METRICS:
            value = getattr(point, key)
            if value is None:  # not measured (a table without latency): not reported, never reported as 0
                continue
            value = float(value)
            if not math.isfinite(value):  # never report a NaN: Optuna would keep the trial RUNNING
                value = 0.0 if key.startswith(("pq", "sq", "rq", "miou", "ap")) else worst[key.rsplit("_", 1)[0]]
            out[key] = value
        return out

    val = finite(evaluation.gate)
    selection = finite(evaluation.holdout_gate) if holdout > 0 else val
    metrics = {**selection, **{f"val_{k}": v for k, v in val.items()}, "fit_seconds": fit.fit_seconds}
    out = trial_dir(sweep_dir, number)
    save_gate(fit.gate_for(cfg.beta), out / "gate", extra=gate_record(
        ds, cfg, cfg.beta, [{"beta": cfg.beta, "split": eval_split, **val,
                             "exit_histogram": evaluation.gate.exit_histogram}],
        fitted_on={"split": train_split, "images": fit.train_images, "held_out": holdout}))
    result = {"optuna_trial": number, "params": params, "metrics": metrics,
              "exit_histogram": evaluation.gate.exit_histogram,
              "holdout_exit_histogram": evaluation.holdout_gate.exit_histogram if holdout > 0 else None}
    write_json(out / "result.json", result, indent=None)  # the driver reads it: never half-written
    return metrics


def tune_trainable(config: dict, derived: str, sweep_dir: str, train_split: str, eval_split: str,
                   holdout: float) -> None:
    """The Tune trainable. An error of the trial itself (a bad parameter, a fit that raises) is reported as the
    trial's result, not raised: raised, Tune would retry it like a lost worker, and it would fail the same way
    each time. Tune's retries (the sweep's ``FailureConfig``) are left for what a retry can mend: a trial
    actor or node lost mid-trial. So a transient error inside the trial (a MemoryError, a flaky read) fails the
    trial at once; ``eco-ray sweep --resume`` does not rerun it (it counts), a new sweep does."""
    from ray import tune

    try:
        metrics = run_trial(config, derived, sweep_dir, train_split, eval_split, holdout)
    except Exception as e:  # noqa: BLE001 - any failure of the trial's own code is that trial's result
        traceback.print_exc()  # whole, in the trial's log; the first line goes to Optuna, MLflow and the driver
        metrics = {TRIAL_ERROR: f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:2000]}
    tune.report(metrics)


def read_result(sweep_dir: str | Path, number: int) -> dict | None:
    path = trial_dir(sweep_dir, number) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None
