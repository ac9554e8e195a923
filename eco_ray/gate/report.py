"""Exact evaluation of gate decisions from the derived table, with the baselines every report carries.

Pure numpy over eco_ray.tradeoff: no model runs. The statistics are those of the plain view (what a
served image gets); the oracle knows each image's plain-view per-image PQ, so it is an upper bound for
per-image decisions at the same beta.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eco_ray.derive.table import DerivedSplit
from eco_ray.metrics.panoptic import CategorySet, per_image_pq
from eco_ray.tradeoff import evaluate_assignment, oracle_assignment, static_points

ORACLE_BETAS = tuple([0.0] + np.geomspace(1e-3, 2.0, 30).tolist())


def static_baseline(val: DerivedSplit, categories: CategorySet, cost_cols: dict) -> list[dict]:
    return static_points(val.eval_stats, categories, cost_cols, val.exits)


def oracle_point(val: DerivedSplit, categories: CategorySet, cost_cols: dict, rel_costs: np.ndarray,
                 beta: float) -> dict:
    choice = oracle_assignment(per_image_pq(val.eval_stats), rel_costs, beta)
    return {"beta": float(beta), **evaluate_assignment(val.eval_stats, choice, categories, cost_cols, val.exits)}


def cross_view_oracle_point(val: DerivedSplit, categories: CategorySet, cost_cols: dict, rel_costs: np.ndarray,
                            beta: float, pick_view: int = 1) -> dict:
    """The oracle with the label noise taken out: each image's exit is picked from ANOTHER view's per-image
    PQ (the flipped image: same content, independent noise) and scored on the plain view. What it gains
    over static depth is what the images' real differences in needed depth are worth - the most a gate can
    hope for; the usual oracle also profits from the noise it sees."""
    if len(val.views) <= pick_view:
        raise ValueError(f"the cross-view oracle needs a view {pick_view}; the table has {val.views}")
    choice = oracle_assignment(per_image_pq(val.stats[:, pick_view]), rel_costs, beta)
    return {"beta": float(beta), "picked_on": val.views[pick_view],
            **evaluate_assignment(val.eval_stats, choice, categories, cost_cols, val.exits)}


def static_at(static: list[dict], cost: float, cost_key: str = "encoder_gflops_mean") -> float:
    """PQ of the static-depth curve at ``cost`` (linear between exits): the equal-compute baseline."""
    pts = sorted(static, key=lambda p: p[cost_key])
    return float(np.interp(cost, [p[cost_key] for p in pts], [p["pq"] for p in pts]))


def oracle_curve(val: DerivedSplit, categories: CategorySet, cost_cols: dict, rel_costs: np.ndarray,
                 betas=ORACLE_BETAS) -> list[dict]:
    return [oracle_point(val, categories, cost_cols, rel_costs, b) for b in betas]


def evaluate_choice(val: DerivedSplit, categories: CategorySet, cost_cols: dict, choice: np.ndarray) -> dict:
    return evaluate_assignment(val.eval_stats, choice, categories, cost_cols, val.exits)


def plot_tradeoff(static: list[dict], oracle: list[dict], gates: dict[str, list[dict]], path: str | Path,
                  cost_key: str = "encoder_gflops_mean", title: str = "") -> Path:
    """PQ against mean cost: static-depth curve, oracle curve, and the gate points (one series per label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([p[cost_key] for p in static], [p["pq"] for p in static], "o-", color="0.3", label="static depth")
    for p in static:
        ax.annotate(f"exit {p['exit']}", (p[cost_key], p["pq"]), textcoords="offset points", xytext=(3, -10),
                    fontsize=7, color="0.3")
    pts = sorted(oracle, key=lambda p: p[cost_key])
    ax.plot([p[cost_key] for p in pts], [p["pq"] for p in pts], "--", color="tab:green", label="oracle (per image)")
    markers = iter("s^Dv*Px")
    for label, points in gates.items():
        pts = sorted(points, key=lambda p: p[cost_key])
        ax.plot([p[cost_key] for p in pts], [p["pq"] for p in pts], next(markers, "o"), ls=":", ms=7, label=label)
    ax.set_xlabel({"encoder_gflops_mean": "mean encoder GFLOPs per image", "latency_ms_mean": "mean latency (ms)",
                   "layers_mean": "mean encoder layers"}.get(cost_key, cost_key))
    ax.set_ylabel("validation PQ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
