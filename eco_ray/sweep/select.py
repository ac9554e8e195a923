"""``eco-ray select`` and ``eco-ray models``: pick a gate from a sweep's MLflow runs under a compute
budget, register it and move an alias to it; list what is registered.

The choice rule is plain (on the metrics the sweep scored its trials on: held-out training images by
default, see SweepConfig.holdout; the validation split's figures ride along as ``val_*``): among the sweep's finished trials that meet the budget, the highest PQ (ties:
the cheaper); with ``--min-pq``, the cheapest trial reaching it (ties: the higher PQ). Moving an alias
is one registry call, so servers following ``models:/eco-gate@production`` switch at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from eco_ray.registry import RegistryError

BUDGETS = {"max_gflops": "encoder_gflops_mean", "max_latency_ms": "latency_ms_mean", "min_pq": "pq"}


def choose(points: list[dict], budget: str, limit: float) -> tuple[dict, str]:
    """The chosen point and why, from ``points`` (dicts with pq / encoder_gflops_mean / latency_ms_mean)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {list(BUDGETS)}")
    key = BUDGETS[budget]
    if not points:
        raise RegistryError("the sweep has no finished trials to choose from")
    if budget == "min_pq":
        ok = [p for p in points if p["pq"] >= limit]
        if not ok:
            best = max(points, key=lambda p: p["pq"])
            raise RegistryError(f"no trial reaches PQ >= {limit:g}; the best reaches PQ {best['pq']:.4f} at "
                                f"{best['encoder_gflops_mean']:.4f} GFLOPs (trial {best.get('optuna_trial')})")
        chosen = min(ok, key=lambda p: (p["encoder_gflops_mean"], -p["pq"]))
        why = (f"the cheapest of {len(ok)} trials with PQ >= {limit:g}: {chosen['encoder_gflops_mean']:.4f} mean "
               f"encoder GFLOPs at PQ {chosen['pq']:.4f}")
        return chosen, why
    ok = [p for p in points if p[key] <= limit]
    if not ok:
        cheapest = min(points, key=lambda p: p[key])
        unit = "mean encoder GFLOPs" if key == "encoder_gflops_mean" else "ms mean latency"
        raise RegistryError(f"no trial meets {key} <= {limit:g}; the cheapest available point is "
                            f"{cheapest[key]:.4f} {unit} at PQ {cheapest['pq']:.4f} (trial "
                            f"{cheapest.get('optuna_trial')})")
    chosen = max(ok, key=lambda p: (p["pq"], -p[key]))
    why = (f"the highest PQ of {len(ok)} of {len(points)} trials within {key} <= {limit:g}: PQ {chosen['pq']:.4f} "
           f"at {chosen[key]:.4f}")
    return chosen, why


def sweep_points(client, sweep_run_id: str) -> list[dict]:
    """Finished child runs of a sweep's parent run, as points with their metrics and params."""
    parent = client.get_run(sweep_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep_run_id}' and "
                              f"attributes.status = 'FINISHED'", max_results=50000)
    points = []
    for r in runs:
        m = r.data.metrics
        if "pq" not in m:
            continue
        points.append({"run_id": r.info.run_id, "optuna_trial": int(r.data.tags.get("optuna_trial", -1)),
                       "params": dict(r.data.params), **{k: v for k, v in m.items()}})
    return points


def select(sweep: str, budget: str, limit: float, *, run_dir: str = "runs", tracking_uri: str | None = None,
           registered_model: str = "eco-gate", alias: str = "production") -> dict:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from eco_ray.registry import register_directory

    info_path = Path(run_dir) / "sweeps" / sweep / "sweep.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        sweep_run_id, tracking_uri = info["run_id"], tracking_uri or info["tracking_uri"]
    else:  # a sweep run on another machine: find its parent run by name in MLflow
        from eco_ray.registry import default_tracking_uri

        tracking_uri = tracking_uri or default_tracking_uri(run_dir)
        client = MlflowClient(tracking_uri)
        found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   f"tags.sweep = '{sweep}' and tags.`eco_ray.stage` = 'sweep'", max_results=1)
        if not found:
            raise RegistryError(f"no sweep named {sweep!r} (neither {info_path} nor an MLflow sweep run of that name)")
        sweep_run_id = found[0].info.run_id
    client = MlflowClient(tracking_uri)
    points = sweep_points(client, sweep_run_id)
    chosen, why = choose(points, budget, limit)
    sweep_run = client.get_run(sweep_run_id)
    holdout = float(sweep_run.data.params.get("holdout", 0) or 0)
    why += (f" (scored on the {holdout:.0%} of the training images held out of every fit)" if holdout > 0
            else " (scored on the validation split itself)")
    tags = {"sweep": sweep, "optuna_trial": chosen["optuna_trial"], "derived_key": sweep_run.data.tags.get("derived_key", ""),
            "parent_uri": sweep_run.data.tags.get("parent_uri", ""),
            "parent_version": sweep_run.data.tags.get("parent_version", ""), "budget": f"{budget}={limit:g}",
            **{k: f"{chosen[k]:.6g}" for k in ("pq", "pq_things", "pq_stuff", "encoder_gflops_mean",
                                               "latency_ms_mean", "val_pq", "val_pq_things", "val_pq_stuff",
                                               "val_encoder_gflops_mean", "val_latency_ms_mean") if k in chosen},
            **{f"param.{k}": v for k, v in chosen["params"].items()}}
    version = register_directory(client, registered_model, chosen["run_id"], "gate", tags,
                                 description="eco-ray gates selected from sweeps (Step C)")
    try:
        client.set_registered_model_alias(registered_model, alias, version)
    except MlflowException as e:
        raise RegistryError(f"registered {registered_model} version {version} but could not move alias {alias!r}: "
                            f"{str(e).splitlines()[0]}") from None
    return {"sweep": sweep, "budget": {budget: limit}, "chosen": chosen, "why": why, "registered_model": registered_model,
            "version": version, "alias": alias, "model_uri": f"models:/{registered_model}@{alias}",
            "candidates": len(points), "tracking_uri": tracking_uri,
            "selected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def list_models(tracking_uri: str, names: tuple[str, ...] = ("eco-parent", "eco-gate")) -> list[dict]:
    """Registered versions of the parents and gates with their aliases and key metrics (from tags)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    out = []
    for name in names:
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            continue
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
            tags = dict(v.tags)
            metrics = {k: tags[k] for k in sorted(tags) if k.startswith(("val_pq", "pq", "encoder_gflops", "latency"))}
            out.append({"name": name, "version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                        "run_id": v.run_id, "created": v.creation_timestamp, "metrics": metrics,
                        "tags": {k: tags[k] for k in ("budget", "sweep", "parent_version", "train_run", "steps")
                                 if k in tags}})
    return out
