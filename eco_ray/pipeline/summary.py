"""The pipeline's summary: the static full-depth model against the selected ECO model on the validation split,
the static exit at the same compute, the verdict on the data, and where everything is."""

from __future__ import annotations

from eco_ray.derive.table import CostTable


def summarize(p, data, train, derived, sweep, selected, served, seconds: float) -> dict:
    """Static full-depth model vs. the selected ECO model, on the validation split, plus where things are."""
    exits = derived["exits"]
    val = {int(k): v for k, v in derived["splits"]["val"]["static"].items()}
    gflops = CostTable(derived["costs"]).measure("gflops")
    full_exit = exits[-1]
    static = {"exit": full_exit, **{k: val[full_exit][k] for k in ("pq", "pq_things", "pq_stuff")},
              "encoder_gflops_mean": float(gflops[-1])}
    chosen = selected["chosen"]
    # the validation split's figures (val_*): the sweep selected on held-out training images, never on these
    eco = {k: chosen.get(f"val_{k}", chosen.get(k)) for k in ("pq", "pq_things", "pq_stuff", "encoder_gflops_mean",
                                                              "latency_ms_mean")}
    saved = 1.0 - eco["encoder_gflops_mean"] / static["encoder_gflops_mean"]
    # the static exit that spends no more than the ECO model: the honest comparison at equal compute
    affordable = [e for e, g in enumerate(gflops) if g <= eco["encoder_gflops_mean"] + 1e-12]
    same_compute = None
    if affordable:
        e = affordable[-1]
        same_compute = {"exit": exits[e], "pq": val[exits[e]]["pq"], "encoder_gflops_mean": float(gflops[e])}
    db = p.ctx.tracking_uri
    return {
        "name": p.cfg.name, "seconds": round(seconds, 1), "stage_seconds": {k: round(v, 1) for k, v in p.timings.items()},
        "static_full_depth": static, "eco_selected": eco, "static_at_or_below_eco_compute": same_compute,
        "encoder_gflops_saved": saved, "pq_lost": static["pq"] - eco["pq"], "selection": selected,
        "diagnosis": p.diagnosis,
        "parent": {"model_uri": train["model_uri"], "run_id": train["run_id"], "steps": train["steps"],
                   "train_seconds": train["seconds"]},
        "derived": derived["path"], "sweep": {"name": sweep["name"], "plot": sweep["plot"], "front": len(sweep["front"])},
        "mlflow": {"tracking_uri": db, "ui": f"mlflow ui --backend-store-uri {db}" if db.startswith("sqlite") else db},
        "serving": served, "state": str(p.state_path),
    }


def format_summary(s: dict) -> str:
    st, eco = s["static_full_depth"], s["eco_selected"]
    lines = [
        f"eco-ray pipeline {s['name']!r} finished in {s['seconds'] / 60:.1f} min "
        f"(stages, s: {', '.join(f'{k} {v:.0f}' for k, v in s['stage_seconds'].items())})",
        "",
        f"{'validation split':<34}{'PQ':>7}{'things':>8}{'stuff':>7}{'enc. GFLOPs':>13}",
        f"{'static, full depth (exit ' + str(st['exit']) + ')':<34}{st['pq']:>7.3f}{st['pq_things']:>8.3f}"
        f"{st['pq_stuff']:>7.3f}{st['encoder_gflops_mean']:>13.4f}",
        f"{'ECO selected (' + s['selection']['model_uri'].removeprefix('models:/') + ')':<34}{eco['pq']:>7.3f}"
        f"{eco['pq_things'] or 0:>8.3f}{eco['pq_stuff'] or 0:>7.3f}{eco['encoder_gflops_mean']:>13.4f}",
    ]
    sc = s.get("static_at_or_below_eco_compute")
    if sc:
        lines.append(f"{'static at <= that compute (exit ' + str(sc['exit']) + ')':<34}{sc['pq']:>7.3f}{'':>15}"
                     f"{sc['encoder_gflops_mean']:>13.4f}")
    lines += [
        "",
        f"encoder GFLOPs saved: {s['encoder_gflops_saved']:.1%}; PQ lost: {s['pq_lost']:+.4f} "
        f"(selected under {s['selection']['budget']}: {s['selection']['why']})",
    ]
    d = s.get("diagnosis")
    if d:
        lo, hi = d["cross_view_oracle_lead_ci95"]
        lines.append(f"diagnosis of the data: {d['verdict']} (the cross-view oracle leads static depth by "
                     f"{d['cross_view_oracle_lead']:+.4f} [{lo:+.4f}, {hi:+.4f}] PQ at beta {d['beta']:g}; "
                     f"plot {d['plot']})")
    lines += [
        f"parent: {s['parent']['model_uri']} ({s['parent']['steps']} steps, {s['parent']['train_seconds'] / 60:.1f} min)",
        f"MLflow: {s['mlflow']['tracking_uri']}   UI: {s['mlflow']['ui']}",
        f"sweep {s['sweep']['name']}: Pareto front of {s['sweep']['front']} points, plot {s['sweep']['plot']}",
        (f"serving: {s['serving']['url']} answered {s['serving']['requests']} requests; exits used "
         f"{s['serving']['exits_used']}, mean {s['serving']['encoder_gflops_mean']:.4f} encoder GFLOPs, "
         f"{s['serving']['latency_ms_mean']:.0f} ms") if s["serving"] else "serving: not checked (requests=0)",
        f"state: {s['state']}",
    ]
    return "\n".join(lines)
