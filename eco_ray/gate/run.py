"""``eco-ray gate``: fit gates on a derived dataset, evaluate them exactly beside the baselines, log to MLflow.

``fit_and_evaluate`` is the unit a sweep trial runs (no I/O); ``run_gate`` adds the gate files, the
trade-off plot and the MLflow run, linked to the parent model version the table was derived from.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from eco_ray.derive.table import DerivedDataset, DerivedDataError, relative_costs
from eco_ray.gate.fit import GateConfig, fit_gate, gate_choice
from eco_ray.gate.report import evaluate_choice, oracle_curve, oracle_point, plot_tradeoff, static_baseline


def open_derived(ref: str, tracking_uri: str | None = None) -> DerivedDataset:
    """A derived-dataset directory, or the MLflow run (``runs:/<id>`` or a bare run id) that logged one."""
    if Path(ref).is_dir():
        return DerivedDataset.open(ref)
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = ref[len("runs:/"):].split("/")[0] if ref.startswith("runs:/") else ref
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="derived", tracking_uri=tracking_uri)
    except (MlflowException, OSError) as e:
        raise DerivedDataError(f"{ref!r} is neither a derived-dataset directory nor an MLflow run with one "
                               f"({str(e).splitlines()[0]})") from None
    return DerivedDataset.open(local)


def fit_and_evaluate(ds: DerivedDataset, cfg: GateConfig, betas: list[float] | None = None,
                     train_split: str = "train", eval_split: str = "val", holdout: float = 0.0) -> dict:
    """Fit (once for a budget gate, once per beta for a classifier) and evaluate on ``eval_split`` at each
    beta: ``{"points": [{"beta", "gate", "oracle"}], "static": [...], "gates": {beta: module}, timings}``.

    With ``holdout`` > 0 the gate is fitted on the rest of ``train_split`` only, and each point also carries
    ``"holdout": {"gate", "oracle"}``, the same evaluation on the held-out training images, with
    ``"static_holdout"`` beside it: what a sweep selects on, so that ``eval_split`` stays unseen."""
    cfg.validate()
    betas = [cfg.beta] if not betas else [float(b) for b in betas]
    train, val = ds.split(train_split), ds.split(eval_split)
    held = None
    if holdout > 0:
        train, held = train.hold_out(holdout)  # the same images for every trial of a sweep
    rel = relative_costs(ds.costs(cfg.cost))
    cost_cols = ds.cost_columns()
    categories = ds.categories
    t0 = time.perf_counter()
    gates, fit_seconds = {}, 0.0
    for beta in betas if cfg.kind == "classify" else betas[:1]:
        t = time.perf_counter()
        gates[beta] = fit_gate(train.gate_features, train.quality_of(cfg.quality), rel, ds.exits, replace(cfg, beta=beta))
        fit_seconds += time.perf_counter() - t
    t = time.perf_counter()
    points = []
    for beta in betas:
        gate = gates[beta] if cfg.kind == "classify" else gates[betas[0]]
        point = {"beta": beta}
        for key, split in (("gate", val), ("holdout", held)):
            if split is None:
                continue
            evaluation = {"gate": evaluate_choice(split, categories, cost_cols, gate_choice(gate, split.gate_features,
                                                                                            rel, beta)),
                          "oracle": oracle_point(split, categories, cost_cols, rel, beta)}
            point.update(evaluation if key == "gate" else {"holdout": evaluation})
        points.append(point)
    static = static_baseline(val, categories, cost_cols)
    extra = {"static_holdout": static_baseline(held, categories, cost_cols), "holdout_images": len(held)} \
        if held is not None else {}
    eval_seconds = time.perf_counter() - t
    return {"kind": cfg.kind, "cost": cfg.cost, "relative_costs": rel.tolist(), "points": points, "static": static,
            "gates": gates, "fit_seconds": fit_seconds, "eval_seconds": eval_seconds,
            "seconds": time.perf_counter() - t0, "train_images": len(train), "eval_images": len(val), **extra}


def evaluation_json(result: dict, point: dict) -> dict:
    """The ``--json`` shape of one beta: ``{"beta", "gate", "static", "oracle"}`` (and kind / cost)."""
    return {"beta": point["beta"], "kind": result["kind"], "cost": result["cost"], "gate": point["gate"],
            "static": result["static"], "oracle": point["oracle"]}


def run_gate(derived: str, cfg: GateConfig, betas: list[float] | None = None, *, tracking_uri: str | None = None,
             run_dir: str = "runs", experiment: str = "eco-ray", out: str | None = None,
             train_split: str = "train", eval_split: str = "val", name: str | None = None) -> dict:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from eco_ray.model.io import save_gate
    from eco_ray.registry import default_tracking_uri, ensure_experiment, flat_params

    tracking_uri = tracking_uri or default_tracking_uri(run_dir)
    ds = open_derived(derived, tracking_uri)
    result = fit_and_evaluate(ds, cfg, betas, train_split, eval_split)
    manifest = ds.manifest
    name = name or f"gate-{cfg.kind}-{cfg.cost}-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out_dir = Path(out or Path(run_dir) / "gates" / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"derived_key": manifest["key"], "parent": manifest["parent"], "cost": cfg.cost,
              "costs": {m: ds.costs(m).tolist() for m in ("gflops", "latency", "layers")
                        if m != "latency" or "latency_ms" in manifest["costs"]["exits"][0]},
              "categories": manifest["categories"], "config": asdict(cfg),
              "gate_input": manifest.get("gate_input", "stride32")}
    gate_dirs = {}
    for beta, gate in result["gates"].items():
        sub = out_dir if len(result["gates"]) == 1 else out_dir / f"beta-{beta:g}"
        points = [p for p in result["points"] if cfg.kind == "budget" or p["beta"] == beta]
        save_gate(gate, sub, extra={**common, "beta": beta, "operating_points": [
            {"beta": p["beta"], **{k: p["gate"][k] for k in ("pq", "pq_things", "pq_stuff", "encoder_gflops_mean",
                                                              "latency_ms_mean", "exit_histogram") if k in p["gate"]}}
            for p in points]})
        gate_dirs[beta] = sub
    rel = np.asarray(result["relative_costs"])
    oracle = oracle_curve(ds.split(eval_split), ds.categories, ds.cost_columns(), rel)
    label = "budget gate (one fit)" if cfg.kind == "budget" else "classification gate (one fit per beta)"
    plot = plot_tradeoff(result["static"], oracle, {label: [p["gate"] for p in result["points"]]},
                         out_dir / "tradeoff.png", title=f"{name}: {manifest['parent'].get('uri', '')}, "
                                                         f"cost={cfg.cost}")
    evaluations = [evaluation_json(result, p) for p in result["points"]]
    (out_dir / "evaluation.json").write_text(json.dumps(evaluations, indent=2, default=float))

    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(experiment, run_dir, tracking_uri)
    parent = manifest["parent"]
    run = client.create_run(experiment_id, run_name=name, tags={
        "eco_ray.stage": "gate", "gate_kind": cfg.kind, "cost": cfg.cost, "derived_key": manifest["key"],
        "derived_run_id": manifest.get("mlflow_run_id", ""), "parent_uri": parent["uri"],
        "parent_version": parent.get("version", ""), "parent_run_id": parent.get("run_id", "")})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric("fit_seconds", result["fit_seconds"], now, 0), Metric("eval_seconds", result["eval_seconds"], now, 0)]
    for step, p in enumerate(result["points"]):
        for key in ("pq", "pq_things", "pq_stuff", "miou", "encoder_gflops_mean", "encoder_gflops_p95",
                    "latency_ms_mean", "latency_ms_p95", "layers_mean"):
            if key in p["gate"]:
                metrics.append(Metric(f"val_{key}", p["gate"][key], now, step))
                metrics.append(Metric(f"oracle_{key}", p["oracle"][key], now, step))
        metrics.append(Metric("beta", p["beta"], now, step))
    params = flat_params({**asdict(cfg), "betas": [p["beta"] for p in result["points"]], "derived": str(derived)})
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v[:6000]) for k, v in params.items()])
    client.log_artifacts(run_id, str(out_dir), "gate")
    client.set_terminated(run_id)
    return {"name": name, "run_id": run_id, "path": str(out_dir), "tracking_uri": tracking_uri,
            "gate_dirs": {b: str(d) for b, d in gate_dirs.items()}, "evaluations": evaluations,
            "fit_seconds": result["fit_seconds"], "eval_seconds": result["eval_seconds"], "plot": str(plot)}
