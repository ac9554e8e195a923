"""Every plot eco-ray draws (matplotlib, headless): the stages call these with plain results."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COST_LABELS = {"encoder_gflops_mean": "mean encoder GFLOPs per image", "latency_ms_mean": "mean latency (ms)",
               "layers_mean": "mean encoder layers"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _static_and_oracle(ax, static, oracle, key: str) -> None:
    """Static depth (annotated by exit) and the oracle curve; points are OperatingPoints."""
    pts = [p for p in static if getattr(p, key) is not None]
    if pts:
        ax.plot([p.cost(key) for p in pts], [p.quality for p in pts], "o-", color="0.3", label="static depth")
        for p in pts:
            ax.annotate(f"exit {p.exit}", (p.cost(key), p.quality), textcoords="offset points", xytext=(3, -10),
                        fontsize=7, color="0.3")
    pts = sorted((p for p in oracle if getattr(p, key) is not None), key=lambda p: p.cost(key))
    if pts:
        ax.plot([p.cost(key) for p in pts], [p.quality for p in pts], "--", color="tab:green",
                label="oracle (per image)")
    ax.set_xlabel(COST_LABELS.get(key, key))
    ax.grid(alpha=0.3)


def plot_tradeoff(static, oracle, gates: dict[str, list], path: str | Path, cost_key: str = "encoder_gflops_mean",
                  title: str = "") -> Path:
    """Quality (PQ, or AP for a detector) against mean cost: static-depth curve, oracle curve, and the gate
    points (one series per label)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _static_and_oracle(ax, static, oracle, cost_key)
    markers = iter("s^Dv*Px")
    for label, points in gates.items():
        pts = sorted(points, key=lambda p: p.cost(cost_key))
        ax.plot([p.cost(cost_key) for p in pts], [p.quality for p in pts], next(markers, "o"), ls=":", ms=7,
                label=label)
    ax.set_ylabel(f"validation {static[0].metric.upper() if static else 'PQ'}")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_sweep(summary, path: str | Path) -> Path:
    """Two panels on the same cost axis: the split the trials were selected on (all trials, the Pareto front,
    static depth, the oracle, the budget) and the eval split (the front's gates, static depth, the oracle)."""
    plt = _pyplot()
    key, metric = summary.objective_cost, summary.metric
    sel = summary.selection_split
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.5), sharex=True)
    ax = axes[0]
    done = [t for t in summary.trials if t.metrics is not None]
    for feasible, style in ((True, dict(c="tab:blue", alpha=0.5)), (False, dict(c="tab:red", alpha=0.4, marker="x"))):
        pts = [t.metrics for t in done if bool(t.feasible) == feasible]
        if pts:
            ax.scatter([p[key] for p in pts], [p[metric] for p in pts], s=14,
                       label="trials" if feasible else "trials over budget", **style)
    front = sorted(summary.front, key=lambda p: p[key])
    if front:
        ax.step([p[key] for p in front], [p[metric] for p in front], where="post", c="tab:blue", lw=1.5)
        ax.scatter([p[key] for p in front], [p[metric] for p in front], s=40, facecolors="none", edgecolors="k",
                   label="Pareto front")
    for limit_key, limit in summary.constraints.items():
        if limit_key == key:
            ax.axvline(limit, c="tab:red", ls=":", lw=1, label="budget")
    where = (f"selected on {sel['images']} held-out {sel['split']} images" if sel["held_out"] > 0
             else f"selected on the {sel['split']} split itself (optimistic)")
    _static_and_oracle(ax, summary.static, summary.oracle, key)
    ax.set_title(f"{summary.name}: {summary.complete} trials, front of {len(front)}\n{where}", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    vkey = f"val_{key}"
    front_val = sorted((p for p in summary.front if vkey in p), key=lambda p: p[vkey])
    if front_val:
        ax.scatter([p[vkey] for p in front_val], [p[f"val_{metric}"] for p in front_val], s=40, c="tab:blue",
                   label="the front's gates")
    _static_and_oracle(ax, summary.static_val, summary.oracle_val, key)
    ev = summary.eval_split
    ax.set_title(f"the same gates on the {ev['split']} split ({ev['images']} images, never selected on)", fontsize=9)
    ax.legend(fontsize=8)
    axes[0].set_ylabel(metric.upper())
    return _save(fig, path)


def plot_derived(manifest: dict, path: str | Path) -> Path:
    """Static quality (PQ, or AP for a detector) per exit, and the histogram of each image's shallowest
    sufficient exit, per split."""
    from eco_ray.tasks import get_task

    task = get_task(manifest.get("task", "panoptic"))
    plt = _pyplot()
    exits = manifest["exits"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, s in manifest["splits"].items():
        static = {int(k): v for k, v in s["static"].items()}
        ax1.plot(exits, [static[k][task.metric] for k in exits], marker="o", label=f"{split} {task.metric_label}")
        hist = {int(k): v for k, v in s["sufficient_exit_histogram"].items()}
        counts = np.asarray([hist.get(k, 0) for k in exits], float)
        ax2.plot(exits, counts / max(counts.sum(), 1), marker="s", label=split)
    ax1.set(xlabel="exit (encoder layers run)", ylabel=f"{task.metric_label} (plain view)", xticks=exits,
            title="static depth")
    tol = manifest["config"]["sufficient_tolerance"]
    ax2.set(xlabel="shallowest sufficient exit", ylabel="share of images", xticks=exits,
            title=f"per-image label within {tol} of exit {exits[-1]}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


PQ_SERIES = (("pq", "PQ"), ("pq_things", "PQ things"), ("pq_stuff", "PQ stuff"))


def plot_metric_per_exit(metrics: dict, exits: list[int], path: str | Path, title: str,
                         series: tuple[tuple[str, str], ...] = PQ_SERIES) -> Path | None:
    """A training run's validation metrics per exit (``series``: (key, label), the first the main one, read as
    ``val_<key>_exit<k>``; default PQ all / things / stuff); None before any validation."""
    main, main_label = series[0]
    if f"val_{main}_exit{exits[-1]}" not in metrics:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in series:
        ax.plot(exits, [metrics[f"val_{key}_exit{k}"] for k in exits], marker="o", label=label)
    ax.set_xlabel("exit (encoder layers run)")
    ax.set_ylabel(f"validation {main_label}")
    ax.set_xticks(exits)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{title}: {main_label} per exit")
    return _save(fig, path)


def plot_diagnosis(d, path: str | Path, title: str = "") -> Path:
    """The diagnosis on its split: static depth, the usual oracle, the cross-view oracle and the gate, each
    point with its bootstrap 95% interval on the lead over the static line (right panel)."""
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    metric, label = d.metric, d.metric.upper()
    ax.plot([p["encoder_gflops_mean"] for p in d.static], [p[metric] for p in d.static], "o-", color="0.3",
            label="static depth")
    for p in d.static:
        ax.annotate(f"exit {p['exit']}", (p["encoder_gflops_mean"], p[metric]), textcoords="offset points",
                    xytext=(3, -10), fontsize=7, color="0.3")
    series = [("usual oracle (noise-inflated)", d.oracle, "tab:green", "^"),
              ("cross-view oracle (what is real)", d.cross_view_oracle, "tab:orange", "s")]
    if d.gate is not None:
        series.append((f"gate ({d.gate_source or 'given'})", [d.gate], "tab:blue", "D"))
    for i, (name, leads, colour, marker) in enumerate(series):
        ax.plot([p.encoder_gflops_mean for p in leads], [p.quality for p in leads], marker, color=colour, ls="",
                label=name)
        xs = np.arange(len(leads)) + 0.25 * i
        bx.errorbar(xs, [p.lead for p in leads],
                    yerr=[[p.lead - p.lead_ci95[0] for p in leads], [p.lead_ci95[1] - p.lead for p in leads]],
                    fmt=marker, color=colour, capsize=3, label=name)
    labels = [f"beta {p.beta:g}" for p in d.cross_view_oracle]
    bx.set_xticks(np.arange(len(labels)), labels)
    bx.axhline(0, color="0.3", lw=1)
    bx.axhline(d.min_lead, color="0.5", lw=1, ls=":", label=f"worth it: {d.min_lead:+g}")
    bx.set_ylabel(f"{label} lead over the static line at equal compute")
    bx.set_title(f"verdict: {d.verdict} (95% intervals, {d.images} {d.split} images)", fontsize=9)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    ax.set_xlabel(COST_LABELS["encoder_gflops_mean"])
    ax.set_ylabel(f"{d.split} {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
