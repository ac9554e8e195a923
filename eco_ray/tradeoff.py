"""The accuracy/compute trade-off as plain arithmetic over the derived table (no Ray, no model).

Inputs are the Step-B table: per image i and exit e, additive panoptic statistics ``stats[i, e]`` (see
eco_ray.metrics) and a per-image quality ``quality[i, e]`` (per-image PQ, possibly averaged over flips),
plus one cost per exit (encoder GFLOPs, latency or layer count), ordered shallow to deep.

- ``choose``: THE decision rule, argmax over the allowed exits of quality - beta * cost, ties to the cheaper;
  labels, oracles, both gate kinds and served requests all decide with it (``exit_labels``: the paper's labels);
- ``evaluate_assignment``: the exact dataset-level PQ of ANY per-image choice of exits, by summing the
  chosen rows of statistics (dense, or sparse as the derived table stores them: the same totals to the
  last bit, see eco_ray.metrics.sparse), with its mean / p95 cost and exit histogram;
- ``static_points`` / ``oracle_assignment``: the baselines every report carries;
- ``pareto_front``: the non-dominated points of (maximise quality, minimise cost).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from eco_ray.metrics.panoptic import CategorySet, PanopticStats, aggregate
from eco_ray.metrics.sparse import SparseStats
from eco_ray.results import OperatingPoint


def choose(quality: np.ndarray, relative_cost: Sequence[float], beta: float | np.ndarray,
           allowed: np.ndarray | None = None) -> np.ndarray:
    """The one decision rule of eco-ray: per image, the index of the exit maximising
    ``quality[..., e] - beta * relative_cost[e]`` among the ``allowed`` exits; ties go to the cheaper exit.

    It makes the paper's labels (quality = per-image PQ), the oracle baselines, the decisions of both gate
    kinds (quality = a quality gate's prediction, or a classifier's logits with beta 0) and every served
    request's exit (``allowed`` = the exits a request's budget admits). ``quality`` is (..., E) with exits
    ordered shallow (cheap) to deep; ``beta`` a scalar or one value per image; ``allowed`` (E,) or (..., E)
    booleans."""
    q = np.asarray(quality, dtype=np.float64)
    cost = np.asarray(relative_cost, dtype=np.float64)
    if q.shape[-1] != cost.shape[0]:
        raise ValueError(f"{q.shape[-1]} exits in the quality table but {cost.shape[0]} costs")
    if np.any(np.diff(cost) < 0):
        raise ValueError(f"exit costs must be ordered shallow (cheap) to deep, got {cost.tolist()}")
    utility = q - np.asarray(beta, dtype=np.float64)[..., None] * cost
    if allowed is not None:
        allowed = np.broadcast_to(np.asarray(allowed, dtype=bool), utility.shape)
        if not allowed.any(-1).all():
            raise ValueError("no exit is allowed for some image")
        utility = np.where(allowed, utility, -np.inf)
    return utility.argmax(-1)  # the first maximum: with costs ascending, the cheaper exit


def exit_labels(quality: np.ndarray, costs: Sequence[float], beta: float) -> np.ndarray:
    """The paper's ideal exit per image for ``beta`` (Step C's classification labels): :func:`choose`."""
    return choose(quality, costs, beta)


def select_rows(stats: PanopticStats, choice: np.ndarray) -> PanopticStats:
    """From (N, E, C) statistics, the (N, C) rows of each image's chosen exit index."""
    choice = np.asarray(choice)
    rows = np.arange(stats.tp.shape[0])
    return stats[rows, choice]


def assignment_totals(stats: PanopticStats | SparseStats, choice: np.ndarray) -> PanopticStats:
    """(C,) the statistics of a per-image choice of exit indices, summed over the images."""
    if isinstance(stats, SparseStats):
        return stats.totals(choice)
    return select_rows(stats, choice).sum()


def evaluate_assignment(stats: PanopticStats | SparseStats, choice: np.ndarray, categories: CategorySet,
                        costs: dict[str, Sequence[float]], exits: Sequence[int]) -> OperatingPoint:
    """Exact PQ (all / things / stuff), mIoU, mean and p95 of each cost (``encoder_gflops``, ``layers`` and
    ``latency_ms`` where measured), and the exit histogram of a per-image choice of exit indices; ``stats``
    (N, E, C) dense or sparse."""
    choice = np.asarray(choice, dtype=np.int64)
    r = aggregate(assignment_totals(stats, choice), categories)
    return operating_point(choice, costs, exits, pq=r.pq, pq_things=r.pq_things, pq_stuff=r.pq_stuff, sq=r.sq,
                           rq=r.rq, miou=r.miou)


def operating_point(choice: np.ndarray, costs: dict[str, Sequence[float]], exits: Sequence[int],
                    **quality: float) -> OperatingPoint:
    """The point of a per-image choice of exit indices with its ``quality`` figures (the task's): mean and
    p95 of each cost, and the exit histogram."""
    choice = np.asarray(choice, dtype=np.int64)
    spent = {}
    for name, per_exit in costs.items():
        values = np.asarray(per_exit, dtype=np.float64)[choice]
        spent[f"{name}_mean"] = float(values.mean()) if values.size else 0.0
        spent[f"{name}_p95"] = float(np.percentile(values, 95)) if values.size else 0.0
    counts = np.bincount(choice, minlength=len(exits))
    return OperatingPoint(exit_histogram={int(k): int(n) for k, n in zip(exits, counts)}, **spent, **quality)


def static_points(stats: PanopticStats | SparseStats, categories: CategorySet, costs: dict[str, Sequence[float]],
                  exits: Sequence[int]) -> list[OperatingPoint]:
    """Every image at the same exit, for each exit: the static-depth baseline curve."""
    n = len(stats) if isinstance(stats, SparseStats) else stats.tp.shape[0]
    points = []
    for e, k in enumerate(exits):
        point = evaluate_assignment(stats, np.full(n, e), categories, costs, exits)
        point.exit = int(k)
        points.append(point)
    return points


def oracle_assignment(quality: np.ndarray, costs: Sequence[float], beta: float) -> np.ndarray:
    """The per-image best exit under the same beta, knowing each image's true quality: the upper bound."""
    return choose(quality, costs, beta)


def shallowest_sufficient(quality: np.ndarray, tolerance: float = 0.02) -> np.ndarray:
    """Index of the cheapest exit whose quality is within ``tolerance`` of the deepest exit's, per image."""
    ok = quality >= quality[..., -1:] - tolerance
    return ok.argmax(-1)  # the first True; the deepest exit always qualifies


def pareto_front(quality: Sequence[float], cost: Sequence[float]) -> np.ndarray:
    """Indices of the points not dominated in (maximise quality, minimise cost), sorted by cost.

    A point is dominated when another is at least as good in both and strictly better in one."""
    q = np.asarray(quality, dtype=np.float64)
    c = np.asarray(cost, dtype=np.float64)
    if q.shape != c.shape:
        raise ValueError("quality and cost must have one entry per point")
    order = np.lexsort((-q, c))  # by cost ascending, then quality descending
    front, best = [], -np.inf
    for i in order:
        if q[i] > best:
            front.append(i)
            best = q[i]
    return np.asarray(front, dtype=np.int64)


def hypervolume_2d(quality: Sequence[float], cost: Sequence[float], ref_quality: float, ref_cost: float) -> float:
    """Area dominated by the points and bounded by the reference point (worse quality, higher cost)."""
    idx = pareto_front(quality, cost)
    q = np.asarray(quality, dtype=np.float64)[idx]
    c = np.asarray(cost, dtype=np.float64)[idx]
    keep = (q > ref_quality) & (c < ref_cost)
    q, c = q[keep], c[keep]
    area, prev_q = 0.0, ref_quality
    # sweep from the cheapest point: each front point adds a rectangle up to the reference cost
    for qi, ci in zip(q, c):
        area += (qi - prev_q) * (ref_cost - ci)
        prev_q = qi
    return float(area)
