"""``eco-ray gate``: fit gates on a derived dataset, evaluate them exactly beside the baselines, log to MLflow.

``fit_and_evaluate`` (eco_ray/gate/evaluate.py) is the unit a sweep trial runs; ``run_gate`` adds the gate
files, the trade-off plot and the MLflow run, linked to the parent model version the table was derived from.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from eco_ray.context import RunContext
from eco_ray.derive.table import DerivedDataset, open_derived
from eco_ray.gate.config import GateConfig
from eco_ray.gate.evaluate import fit_and_evaluate, oracle_curve
from eco_ray.results import FitResult


def gate_record(ds: DerivedDataset, cfg: GateConfig, beta: float, operating_points: list[dict],
                fitted_on: dict | None = None) -> dict:
    """What a saved gate records beside its weights (``eco_config.json``): the table and parent it was fitted
    on, the cost measure its beta is in (serving decides with the same one), every exit's costs, the gate
    input, its settings and its operating points."""
    m = ds.manifest
    record = {"derived_key": m["key"], "task": ds.task, "parent": m["parent"], "beta": float(beta), "cost": cfg.cost,
              "costs": ds.cost_table.per_measure(), "categories": m["categories"], "config": asdict(cfg),
              "gate_input": m.get("gate_input", "stride32"), "operating_points": operating_points}
    if fitted_on is not None:
        record["fitted_on"] = fitted_on
    return record


@dataclass
class GateRun:
    name: str
    run_id: str
    path: str
    tracking_uri: str
    gate_dirs: dict[float, str]
    fit: FitResult
    plot: str

    @property
    def evaluations(self) -> list[dict]:
        """The ``--json`` shape, one entry per beta."""
        return [self.fit.evaluation_json(e) for e in self.fit.evaluations]


def run_gate(derived: str, cfg: GateConfig, betas: list[float] | None = None, *, ctx: RunContext,
             out: str | None = None, train_split: str = "train", eval_split: str = "val",
             name: str | None = None) -> GateRun:
    from eco_ray.model.io import save_gate
    from eco_ray.plots import plot_tradeoff
    from eco_ray.tracking import Stage, Tag, parent_links

    ds = open_derived(derived, ctx.tracking_uri)
    fit = fit_and_evaluate(ds, cfg, betas, train_split, eval_split)
    manifest = ds.manifest
    name = name or f"gate-{cfg.kind}-{cfg.cost}-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out_dir = Path(out) if out else ctx.gate_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    gate_dirs = {}
    for beta, gate in fit.gates.items():
        sub = out_dir if len(fit.gates) == 1 else out_dir / f"beta-{beta:g}"
        points = [{"beta": e.beta, **e.gate.to_json()} for e in fit.evaluations
                  if cfg.kind == "quality" or e.beta == beta]
        save_gate(gate, sub, extra=gate_record(ds, cfg, beta, points))
        gate_dirs[beta] = str(sub)
    oracle = oracle_curve(ds.split(eval_split), ds.categories, ds.cost_columns(), fit.relative_costs)
    label = "quality gate (one fit)" if cfg.kind == "quality" else "classification gate (one fit per beta)"
    plot = plot_tradeoff(fit.static, oracle, {label: [e.gate for e in fit.evaluations]}, out_dir / "tradeoff.png",
                         title=f"{name}: {manifest['parent'].get('uri', '')}, cost={cfg.cost}")
    evaluations = [fit.evaluation_json(e) for e in fit.evaluations]
    (out_dir / "evaluation.json").write_text(json.dumps(evaluations, indent=2, default=float))

    tracker = ctx.tracker()
    tags = {Tag.GATE_KIND: cfg.kind, Tag.COST: cfg.cost, Tag.DERIVED_KEY: manifest["key"],
            Tag.DERIVED_RUN_ID: manifest.get("mlflow_run_id", ""), **parent_links(manifest["parent"])}
    params = {**asdict(cfg), "betas": [e.beta for e in fit.evaluations], "derived": str(derived)}
    with tracker.run(Stage.GATE, name, tags, params) as run_id:
        metrics = [("fit_seconds", fit.fit_seconds, 0), ("eval_seconds", fit.eval_seconds, 0)]
        for step, e in enumerate(fit.evaluations):
            for key, value in e.gate.metrics().items():
                metrics.append((f"val_{key}", value, step))
            for key, value in e.oracle.metrics().items():
                metrics.append((f"oracle_{key}", value, step))
            metrics.append(("beta", e.beta, step))
        tracker.log_metrics(run_id, metrics)
        tracker.log_artifacts(run_id, out_dir, "gate")
    return GateRun(name, run_id, str(out_dir), ctx.tracking_uri, gate_dirs, fit, str(plot))
