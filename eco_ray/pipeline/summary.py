"""The pipeline's summary: the static full-depth model against the selected ECO model on the validation split,
the static exit at the same compute, the verdict on the data, and where everything is."""

from __future__ import annotations

from eco_ray.derive.table import CostTable


def summarize(p, data, train, derived, sweep, selected, served, seconds: float) -> dict:
    """Static full-depth model vs. the selected ECO model, on the validation split, plus where things are; in
    the task's metric (``pq``, ``pq_things``, ``pq_stuff`` for a segmenter; ``ap``, ``ap50``, ``ap75`` for a
    detector)."""
    metric, series = p.task.metric, [key for key, _ in p.task.validation_series]
    exits = derived["exits"]
    val = {int(k): v for k, v in derived["splits"]["val"]["static"].items()}
    gflops = CostTable(derived["costs"]).measure("gflops")
    full_exit = exits[-1]
    static = {"exit": full_exit, **{k: val[full_exit][k] for k in series}, "encoder_gflops_mean": float(gflops[-1])}
    chosen = selected["chosen"]
    # the validation split's figures (val_*): the sweep selected on held-out training images, never on these
    eco = {k: chosen.get(f"val_{k}", chosen.get(k)) for k in (*series, "encoder_gflops_mean", "latency_ms_mean")}
    saved = 1.0 - eco["encoder_gflops_mean"] / static["encoder_gflops_mean"]
    # the static exit that spends no more than the ECO model: the honest comparison at equal compute
    affordable = [e for e, g in enumerate(gflops) if g <= eco["encoder_gflops_mean"] + 1e-12]
    same_compute = None
    if affordable:
        e = affordable[-1]
        same_compute = {"exit": exits[e], metric: val[exits[e]][metric], "encoder_gflops_mean": float(gflops[e])}
    db = p.ctx.tracking_uri
    return {
        "name": p.cfg.name, "task": p.task.name, "metric": metric, "seconds": round(seconds, 1),
        "stage_seconds": {k: round(v, 1) for k, v in p.timings.items()},
        "static_full_depth": static, "eco_selected": eco, "static_at_or_below_eco_compute": same_compute,
        "encoder_gflops_saved": saved, f"{metric}_lost": static[metric] - eco[metric], "selection": selected,
        "diagnosis": p.diagnosis,
        "parent": {"model_uri": train["model_uri"], "run_id": train["run_id"], "steps": train["steps"],
                   "train_seconds": train["seconds"]},
        "derived": derived["path"], "sweep": {"name": sweep["name"], "plot": sweep["plot"], "front": len(sweep["front"])},
        "mlflow": {"tracking_uri": db, "ui": f"mlflow ui --backend-store-uri {db}" if db.startswith("sqlite") else db},
        "serving": served, "state": str(p.state_path),
    }


def format_summary(s: dict) -> str:
    from eco_ray.tasks import get_task

    task = get_task(s.get("task", "panoptic"))
    metric, label = task.metric, task.metric_label
    series = [(k, name.removeprefix(f"{label} ")) for k, name in task.validation_series]  # "things", not "PQ things"
    st, eco = s["static_full_depth"], s["eco_selected"]
    widths = [max(len(name) + 2, 7) if i else 7 for i, (_, name) in enumerate(series)]

    selected = f"ECO selected ({s['selection']['model_uri'].removeprefix('models:/')})"
    first = max(34, len(selected))  # the value columns are right-aligned: their width keeps them apart

    def row(title: str, point: dict, keys) -> str:
        cells = "".join(f"{point[k]:>{w}.3f}" if point.get(k) is not None else f"{'':>{w}}"
                        for (k, _), w in zip(series, widths) if k in keys)
        pad = "".join(f"{'':>{w}}" for (k, _), w in zip(series, widths) if k not in keys)
        return f"{title:<{first}}{cells}{pad}{point['encoder_gflops_mean']:>13.4f}"

    every = [k for k, _ in series]
    lines = [
        f"eco-ray pipeline {s['name']!r} ({task.name}) finished in {s['seconds'] / 60:.1f} min "
        f"(stages, s: {', '.join(f'{k} {v:.0f}' for k, v in s['stage_seconds'].items())})",
        "",
        f"{'validation split':<{first}}{''.join(f'{name:>{w}}' for (_, name), w in zip(series, widths))}{'enc. GFLOPs':>13}",
        row(f"static, full depth (exit {st['exit']})", st, every),
        row(selected, eco, every),
    ]
    sc = s.get("static_at_or_below_eco_compute")
    if sc:
        lines.append(row(f"static at <= that compute (exit {sc['exit']})", sc, [metric]))
    lines += [
        "",
        f"encoder GFLOPs saved: {s['encoder_gflops_saved']:.1%}; {label} lost: {s[f'{metric}_lost']:+.4f} "
        f"(selected under {s['selection']['budget']}: {s['selection']['why']})",
    ]
    d = s.get("diagnosis")
    if d:
        lo, hi = d["cross_view_oracle_lead_ci95"]
        lines.append(f"diagnosis of the data: {d['verdict']} (the cross-view oracle leads static depth by "
                     f"{d['cross_view_oracle_lead']:+.4f} [{lo:+.4f}, {hi:+.4f}] {label} at beta {d['beta']:g}; "
                     f"plot {d['plot']})")
    sv = s["serving"]
    lines += [
        f"parent: {s['parent']['model_uri']} ({s['parent']['steps']} steps, {s['parent']['train_seconds'] / 60:.1f} min)",
        f"MLflow: {s['mlflow']['tracking_uri']}   UI: {s['mlflow']['ui']}",
        f"sweep {s['sweep']['name']}: Pareto front of {s['sweep']['front']} points, plot {s['sweep']['plot']}",
        (f"serving: {sv['url']}{sv.get('route', '/v1/segment')} answered {sv['requests']} requests; exits used "
         f"{sv['exits_used']}, mean {sv['encoder_gflops_mean']:.4f} encoder GFLOPs, "
         f"{sv['latency_ms_mean']:.0f} ms") if sv else "serving: not checked (requests=0)",
        f"state: {s['state']}",
    ]
    return "\n".join(lines)
