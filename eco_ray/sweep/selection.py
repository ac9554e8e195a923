"""``eco-ray select`` and ``eco-ray models``: pick a gate from a sweep's MLflow runs under a budget, register
it and move an alias to it; list what is registered.

The choice rule is plain (on the metrics the sweep scored its trials on: held-out training images by
default, see SweepConfig.holdout; the validation split's figures ride along as ``val_*``): among the sweep's
finished trials that meet the budget, the highest PQ (AP for a detector's gates; ties: the cheaper); under a
``min_pq`` (``min_ap``) budget, the cheapest trial reaching it (ties: the higher quality). Moving an alias is one registry call, so servers
following ``models:/eco-gate@production`` switch at once. Registering is idempotent: the same selection
again (same sweep, trial, budget and alias) returns the version it registered the first time.
"""

from __future__ import annotations

import json
import time

from eco_ray.budget import METRICS, Budget
from eco_ray.config import content_hash
from eco_ray.context import RunContext
from eco_ray.results import Selection
from eco_ray.tracking import RegistryError, Tag

# the metrics a registered gate version carries as tags (the selection split's and the eval split's)
_TAGGED = ("pq", "pq_things", "pq_stuff", "ap", "ap50", "ap75", "encoder_gflops_mean", "latency_ms_mean")
TAGGED_METRICS = (*_TAGGED, *(f"val_{k}" for k in _TAGGED))


def pick_trial(points: list[dict], budget: Budget) -> tuple[dict, str]:
    """The chosen point and why, from ``points`` (dicts with pq or ap / encoder_gflops_mean / latency_ms_mean)."""
    if budget.relative:
        raise RegistryError(f"{budget}: make the budget absolute first")
    if not points:
        raise RegistryError("the sweep has no finished trials to choose from")
    q = "ap" if "ap" in points[0] else "pq"  # the quality the trials were scored on: a detector's AP, or PQ
    label = q.upper()
    if budget.is_lower_limit:
        if budget.metric != q:
            raise RegistryError(f"{budget}: the sweep's trials were scored on {label}; use min_{q}")
        ok = [p for p in points if budget.admits(p)]
        if not ok:
            best = max(points, key=lambda p: p[q])
            raise RegistryError(f"no trial reaches {label} >= {budget.limit:g}; the best reaches {label} "
                                f"{best[q]:.4f} at {best['encoder_gflops_mean']:.4f} GFLOPs (trial "
                                f"{best.get('optuna_trial')})")
        chosen = min(ok, key=lambda p: (p["encoder_gflops_mean"], -p[q]))
        why = (f"the cheapest of {len(ok)} trials with {label} >= {budget.limit:g}: {chosen['encoder_gflops_mean']:.4f} "
               f"mean encoder GFLOPs at {label} {chosen[q]:.4f}")
        return chosen, why
    key = budget.key
    if any(key not in p for p in points):
        raise RegistryError(f"the sweep's trials have no {key}: the table was derived without it (measure_latency)")
    ok = [p for p in points if budget.admits(p)]
    if not ok:
        cheapest = min(points, key=lambda p: p[key])
        unit = METRICS[budget.metric][2]
        raise RegistryError(f"no trial meets {key} <= {budget.limit:g}; the cheapest available point is "
                            f"{cheapest[key]:.4f} {unit} at {label} {cheapest[q]:.4f} (trial "
                            f"{cheapest.get('optuna_trial')})")
    chosen = max(ok, key=lambda p: (p[q], -p[key]))
    why = (f"the highest {label} of {len(ok)} of {len(points)} trials within {key} <= {budget.limit:g}: {label} "
           f"{chosen[q]:.4f} at {chosen[key]:.4f}")
    return chosen, why


def sweep_points(tracker, sweep_run_id: str) -> list[dict]:
    """Finished child runs of a sweep's parent run, as points with their metrics and params."""
    points = []
    for r in tracker.child_runs(sweep_run_id, finished_only=True):
        m = r.data.metrics
        if "pq" not in m and "ap" not in m:
            continue
        points.append({"run_id": r.info.run_id, "optuna_trial": int(r.data.tags.get(Tag.TRIAL, -1)),
                       "params": dict(r.data.params), **dict(m)})
    return points


def _sweep_run(sweep: str, ctx: RunContext) -> tuple[str, str]:
    """(the sweep's MLflow run id, its tracking URI): from the sweep's directory, else searched in MLflow (a
    sweep run on another machine)."""
    info_path = ctx.sweep_dir(sweep) / "sweep.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        return info["run_id"], info["tracking_uri"]
    found = ctx.tracker().find_sweep_run(sweep)
    if found is None:
        raise RegistryError(f"no sweep named {sweep!r} (neither {info_path} nor an MLflow sweep run of that name)")
    return found.info.run_id, ctx.tracking_uri


def select(sweep: str, budget: Budget, *, ctx: RunContext, registered_model: str | None = None,
           alias: str = "production", full_depth: dict | None = None, token: str | None = None) -> Selection:
    """Choose under ``budget`` (a relative one is made absolute with ``full_depth``, the full-depth value of
    its metric), register the trial's gate (as ``registered_model``; default eco-gate, or eco-det-gate for a
    detector's) and move ``alias`` to it. ``token`` makes a repeated selection return the version it registered
    (default: the sweep, trial, budget, model and alias)."""
    from eco_ray.tracking import Tracker

    sweep_run_id, tracking_uri = _sweep_run(sweep, ctx)
    tracker = Tracker(tracking_uri, ctx.run_dir, ctx.experiment)
    budget = budget.absolute((full_depth or {}).get(budget.metric)) if budget.relative else budget
    points = sweep_points(tracker, sweep_run_id)
    chosen, why = pick_trial(points, budget)
    registered_model = registered_model or ("eco-det-gate" if "ap" in chosen else "eco-gate")
    sweep_run = tracker.run_data(sweep_run_id)
    holdout = float(sweep_run.params.get("holdout", 0) or 0)
    why += (f" (scored on the {holdout:.0%} of the training images held out of every fit)" if holdout > 0
            else " (scored on the validation split itself)")
    tags = {Tag.SWEEP: sweep, Tag.TRIAL: chosen["optuna_trial"], Tag.DERIVED_KEY: sweep_run.tags.get(Tag.DERIVED_KEY, ""),
            Tag.PARENT_URI: sweep_run.tags.get(Tag.PARENT_URI, ""),
            Tag.PARENT_VERSION: sweep_run.tags.get(Tag.PARENT_VERSION, ""), "budget": str(budget),
            **{k: f"{chosen[k]:.6g}" for k in TAGGED_METRICS if k in chosen},
            **{f"param.{k}": v for k, v in chosen["params"].items()}}
    token = token or content_hash({"sweep_run": sweep_run_id, "trial_run": chosen["run_id"], "budget": str(budget),
                                   "model": registered_model, "alias": alias})
    version = tracker.register(registered_model, chosen["run_id"], "gate", tags,
                               description="eco-ray gates selected from sweeps (Step C)", token=token)
    tracker.set_alias(registered_model, alias, version)
    return Selection(sweep=sweep, budget=str(budget), chosen=chosen, why=why, registered_model=registered_model,
                     version=version, alias=alias, model_uri=f"models:/{registered_model}@{alias}",
                     candidates=len(points), tracking_uri=tracking_uri,
                     selected_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def list_models(tracking_uri: str, names: tuple[str, ...] = ("eco-parent", "eco-gate", "eco-det-parent",
                                                             "eco-det-gate")) -> list[dict]:
    """Registered versions of the parents and gates with their aliases and key metrics (from tags)."""
    from eco_ray.tracking import Tracker

    out = []
    for v in Tracker(tracking_uri).registered_versions(names):
        tags = v.pop("tags")
        v["metrics"] = {k: tags[k] for k in sorted(tags)
                        if k.startswith(("val_pq", "pq", "val_ap", "ap", "encoder_gflops", "latency"))}
        v["tags"] = {k: tags[k] for k in ("budget", "sweep", "parent_version", "train_run", "steps") if k in tags}
        out.append(v)
    return out
