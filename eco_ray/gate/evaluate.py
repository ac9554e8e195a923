"""Exact evaluation of gate decisions from the derived table, with the baselines every report carries.

Pure numpy over eco_ray.tradeoff: no model runs. The statistics are those of the plain view (what a
served image gets), the quality the table's task's (PQ, or COCO AP for a detector); the oracle knows each
image's plain-view label, so it is an upper bound for per-image decisions at the same beta. ``fit_and_evaluate`` is the unit a sweep trial runs (no I/O).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from eco_ray.derive.table import DerivedDataset, DerivedSplit, relative_costs
from eco_ray.gate.config import GateConfig
from eco_ray.gate.fit import fit_gate
from eco_ray.metrics.panoptic import CategorySet
from eco_ray.model.gates import decide
from eco_ray.results import FitResult, GateEvaluation, OperatingPoint
from eco_ray.tradeoff import choose

ORACLE_BETAS = tuple([0.0] + np.geomspace(1e-3, 2.0, 30).tolist())


def static_baseline(split: DerivedSplit, categories: CategorySet, cost_cols: dict) -> list[OperatingPoint]:
    """Every image at the same exit, for each exit: the static-depth curve."""
    points = []
    for e, k in enumerate(split.exits):
        point = split.operating_point(np.full(len(split), e), categories, cost_cols)
        point.exit = int(k)
        points.append(point)
    return points


def evaluate_choice(split: DerivedSplit, categories: CategorySet, cost_cols: dict, choice: np.ndarray,
                    beta: float | None = None) -> OperatingPoint:
    """The exact quality (the table's task's: PQ or AP) and costs of a per-image choice of exit indices."""
    point = split.operating_point(np.asarray(choice, np.int64), categories, cost_cols)
    point.beta = None if beta is None else float(beta)
    return point


def oracle_point(split: DerivedSplit, categories: CategorySet, cost_cols: dict, rel_costs: np.ndarray,
                 beta: float) -> OperatingPoint:
    choice = choose(split.quality_per_view[:, 0], rel_costs, beta)
    return evaluate_choice(split, categories, cost_cols, choice, beta)


def cross_view_oracle_point(split: DerivedSplit, categories: CategorySet, cost_cols: dict, rel_costs: np.ndarray,
                            beta: float, pick_view: int = 1) -> OperatingPoint:
    """The oracle with the label noise taken out: each image's exit is picked from ANOTHER view's per-image
    PQ (the flipped image: same content, independent noise) and scored on the plain view. What it gains
    over static depth is what the images' real differences in needed depth are worth - the most a gate can
    hope for; the usual oracle also profits from the noise it sees (eco_ray.diagnose adds intervals)."""
    if len(split.views) <= pick_view:
        raise ValueError(f"the cross-view oracle needs a view {pick_view}; the table has {split.views}")
    choice = choose(split.quality_per_view[:, pick_view], rel_costs, beta)
    return replace(evaluate_choice(split, categories, cost_cols, choice, beta), picked_on=split.views[pick_view])


def oracle_curve(split: DerivedSplit, categories: CategorySet, cost_cols: dict, rel_costs: np.ndarray,
                 betas=ORACLE_BETAS) -> list[OperatingPoint]:
    return [oracle_point(split, categories, cost_cols, rel_costs, b) for b in betas]


def fit_and_evaluate(ds: DerivedDataset, cfg: GateConfig, betas: list[float] | None = None,
                     train_split: str = "train", eval_split: str = "val", holdout: float = 0.0) -> FitResult:
    """Fit (once for a quality gate, once per beta for a classifier) and evaluate on ``eval_split`` at each
    beta, beside static depth and the oracle.

    With ``holdout`` > 0 the gate is fitted on the rest of ``train_split`` only, and each evaluation also
    carries the same evaluation on the held-out training images, with ``static_holdout`` beside it: what a
    sweep selects on, so that ``eval_split`` stays unseen."""
    cfg.validate()
    betas = [cfg.beta] if not betas else [float(b) for b in betas]
    train, val = ds.split(train_split), ds.split(eval_split)
    if cfg.quality is not None and cfg.quality not in train.measures:
        raise ValueError(f"quality must be one of {train.measures} for a {ds.task} table, got {cfg.quality!r}")
    held = None
    if holdout > 0:
        train.quality_per_view  # per image: computed once per process, the parts of every trial inherit it
        train, held = train.hold_out(holdout)  # the same images for every trial of a sweep
    rel = relative_costs(ds.costs(cfg.cost))
    cost_cols = ds.cost_columns()
    categories = ds.categories
    gates, fit_seconds = {}, 0.0
    for beta in betas if cfg.kind == "classify" else betas[:1]:
        t = time.perf_counter()
        gates[beta] = fit_gate(train.gate_features, train.quality_of(cfg.quality), rel, ds.exits,
                               replace(cfg, beta=beta))
        fit_seconds += time.perf_counter() - t
    t = time.perf_counter()
    evaluations = []
    for beta in betas:
        gate = gates[beta] if beta in gates else gates[betas[0]]

        def on(split):
            return (evaluate_choice(split, categories, cost_cols, decide(gate, split.gate_features, rel, beta), beta),
                    oracle_point(split, categories, cost_cols, rel, beta))

        gate_point, oracle = on(val)
        evaluation = GateEvaluation(beta, gate_point, oracle)
        if held is not None:
            evaluation.holdout_gate, evaluation.holdout_oracle = on(held)
        evaluations.append(evaluation)
    result = FitResult(
        kind=cfg.kind, cost=cfg.cost, relative_costs=rel.tolist(), evaluations=evaluations,
        static=static_baseline(val, categories, cost_cols), gates=gates, fit_seconds=fit_seconds, eval_seconds=0.0,
        train_images=len(train), eval_images=len(val),
        static_holdout=static_baseline(held, categories, cost_cols) if held is not None else None,
        holdout_images=len(held) if held is not None else 0)
    result.eval_seconds = time.perf_counter() - t
    return result
