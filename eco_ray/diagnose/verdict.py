"""Will adaptive depth pay off on this data? A verdict from the derived table alone (Ray-free, no model pass).

Per-image quality labels are noisy: the same model at the same exit scores an image and its mirror
differently, so the usual oracle (pick each image's exit from its own per-image PQ, score it on the same
image) leads the static-depth line partly on noise. What is real survives a change of view:

- **label noise**: the share of (image, exit) pairs whose per-image PQ moves more than ``tolerance``
  between the two views, and the **reliability** of each image's gain from depth (the correlation of
  q_deepest - q_k between the views; 1 = all real, 0 = all noise);
- the **cross-view oracle**: each image's exit picked on the flipped view and scored on the plain one, so
  the noise it picks on is independent of the noise it is scored with. Its lead over the static line at the
  same mean encoder GFLOPs is what the images' real differences in needed depth are worth, with a bootstrap
  95% interval over images (the dataset metric recomputed exactly from the stored statistics or matching
  records per resample);
- a **probe**: how much of the real gain a cross-validated linear model can predict from the gate input
  (and from any image-level attribute the table holds), as a share of the ceiling sqrt(reliability);
- optionally a fitted **gate**'s lead, with its interval, on images no fit saw.

The verdict: ``pays`` when the cross-view oracle leads by at least ``min_lead`` with the interval above 0 at
some beta; ``does not pay`` when the interval lies below ``min_lead`` at every beta; otherwise ``cannot tell
yet``, with the number of images that would narrow the interval to +-``target_halfwidth``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from eco_ray.bootstrap import interval, resample_counts
from eco_ray.derive.table import relative_costs
from eco_ray.errors import EcoRayError
from eco_ray.metrics.panoptic import CategorySet, PanopticStats, ground_truth_pq, totals_summary
from eco_ray.tradeoff import choose

SCHEMA_VERSION = 3  # 3: per_kind_by_exit's PQ averages over the kind's ground-truth categories
VERDICTS = ("pays", "does not pay", "cannot tell yet")
DEFAULT_BETAS = (0.02, 0.1, 0.3)
# the betas that trace the cross-view oracle's curve, to read it at a gate's compute
_CURVE_BETAS = tuple([0.0] + np.geomspace(1e-3, 2.0, 30).tolist())


class DiagnoseError(EcoRayError):
    """A table the diagnosis cannot read: one view only, an empty split, a missing column."""


@dataclass
class Lead:
    """A per-image exit choice against the static-depth line at the same mean encoder GFLOPs."""

    quality: float  # the dataset metric of the choice: PQ, or AP for a detector
    encoder_gflops_mean: float
    static_at_cost: float  # the straight line between the two static exits around that compute
    lead: float  # quality - static_at_cost
    lead_ci95: tuple[float, float]
    exit_histogram: dict[int, int]
    beta: float | None = None


@dataclass
class Probe:
    input: str  # "gate input", "kind", "gate input + kind", ...
    correlation: float  # of the cross-validated prediction with one view's gain
    share: float | None  # correlation / ceiling (None when the ceiling is ~0: nothing real to predict)


@dataclass
class Diagnosis:
    split: str
    images: int
    views: list[str]
    exits: list[int]
    encoder_gflops: list[float]
    metric: str  # what quality is: "pq" | "ap"
    static: list[dict]  # per exit: exit, the metric and its parts (pq_things, ... | ap50, ...), encoder_gflops_mean
    oracle: list[Lead]  # picks and scores on the plain view: inflated by label noise
    cross_view_oracle: list[Lead]
    label_noise_share: float
    label_noise_mean_abs_diff: float
    tolerance: float
    gain_reliability: dict[int, float]  # per shallower exit k: corr between views of q_deepest - q_k
    probe_split: str
    probe_images: int
    probe_ceiling: float
    probes: list[Probe]
    per_kind_by_exit: dict[str, dict[int, float]]  # the metric over each kind's images (PQ: its own categories)
    gate: Lead | None
    gate_source: str | None
    gate_capture: float | None  # gate lead / cross-view oracle lead at the gate's compute
    verdict: str
    reasons: list[str]
    images_for_tight_interval: int | None
    min_lead: float
    target_halfwidth: float
    resamples: int
    seconds: float = 0.0
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def cross_view_oracle_lead(self) -> Lead:
        """The beta at which the cross-view oracle leads most (the headline figure)."""
        return max(self.cross_view_oracle, key=lambda p: p.lead)

    def to_json(self) -> dict:
        out = asdict(self)
        best = self.cross_view_oracle_lead
        # the headline keys of benchmarks/report.py's `diagnose` entry, stable across versions
        out.update({"label_noise_share": self.label_noise_share,
                    "gain_reliability_headline": self.gain_reliability.get(self.exits[0]),
                    "cross_view_oracle_lead_headline": best.lead,
                    "cross_view_oracle_lead_headline_ci95": list(best.lead_ci95),
                    "probe_share": self.probes[0].share if self.probes else None})
        return _jsonable(out)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, (int, np.integer)) else k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ------------------------------------------------------------------------------------------- the pieces
def _static_line(costs: np.ndarray, static_quality: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """The static curve read at ``cost``, per resample: static_quality (B, E), cost (B,) -> (B,). Linear between
    exits, clamped at the ends (as np.interp)."""
    costs = np.asarray(costs, np.float64)
    c = np.clip(cost, costs[0], costs[-1])
    j = np.clip(np.searchsorted(costs, c, side="right") - 1, 0, len(costs) - 2) if len(costs) > 1 else np.zeros_like(c, int)
    if len(costs) == 1:
        return static_quality[:, 0]
    span = costs[j + 1] - costs[j]
    t = np.where(span > 0, (c - costs[j]) / np.where(span > 0, span, 1), 0.0)
    rows = np.arange(static_quality.shape[0])
    return static_quality[rows, j] + t * (static_quality[rows, j + 1] - static_quality[rows, j])


class _Scorer:
    """The exact dataset metric and the static line of one split, on the full sample and on every resample
    (row 0 of ``weights``: every image once; the others: bootstrap counts). One subclass per task."""

    metric = ""
    parts: tuple[str, ...] = ()  # the static rows' other figures

    def __init__(self, split, categories: CategorySet | None, costs: Sequence[float], resamples: int, seed: int):
        self.split, self.exits = split, [int(k) for k in split.exits]
        self.costs = np.asarray(costs, np.float64)
        n = len(split)
        self.weights = np.vstack([np.ones((1, n)), resample_counts(n, resamples, seed)])
        self.static_quality = self._resampled(None)  # (1 + B, E)

    def _resampled(self, choice: np.ndarray | None) -> np.ndarray:
        """(1 + B,) the metric of ``choice`` per resample; (1 + B, E) of each static exit for None."""
        raise NotImplementedError

    def point(self, choice: np.ndarray) -> float:
        """The metric of ``choice`` on the full sample."""
        raise NotImplementedError

    def static_rows(self) -> list[dict]:
        raise NotImplementedError

    def per_kind(self) -> dict[str, dict[int, float]]:
        raise NotImplementedError

    def lead(self, choice: np.ndarray, beta: float | None = None) -> Lead:
        quality = self._resampled(choice)  # (1 + B,)
        n = len(choice)
        cost = self.weights @ self.costs[choice] / n  # (1 + B,)
        line = _static_line(self.costs, self.static_quality, cost)
        leads = quality - line
        counts = np.bincount(choice, minlength=len(self.costs))
        return Lead(float(quality[0]), float(cost[0]), float(line[0]), float(leads[0]), interval(leads[1:]),
                    dict(zip(self.exits, map(int, counts))), beta)

    def kinds(self) -> list[str]:
        return sorted(set(self.split.kinds.tolist()) - {""})


class _PanopticScorer(_Scorer):
    metric, parts = "pq", ("pq_things", "pq_stuff")

    def __init__(self, split, categories, costs, resamples, seed):
        self.stats, self.isthing = split.eval_stats, categories.isthing  # the plain view
        # dataset PQ is made of two sums per category: the matched IoU and 2 x (TP + FP/2 + FN/2), an integer
        v = self.stats.values
        self._pq_values = {"iou_sum": v["iou_sum"],
                           "denominator2": 2 * v["tp"].astype(np.int64) + v["fp"] + v["fn"]}
        super().__init__(split, categories, costs, resamples, seed)

    def _resampled(self, choice):
        totals = self.stats.weighted_totals(self.weights, choice, names=tuple(self._pq_values),
                                            values=self._pq_values)
        # totals_summary's PQ from the two sums: TP + FP/2 + FN/2 is denominator2 / 2 exactly (the other
        # fields stay zero; SQ, RQ and mIoU are not read here)
        zeros = np.zeros_like(totals["denominator2"])
        stats = PanopticStats(iou_sum=totals["iou_sum"], tp=totals["denominator2"] * 0.5, fp=zeros, fn=zeros,
                              sem_inter=zeros, sem_union=zeros)
        return totals_summary(stats, self.isthing)["pq"]

    def point(self, choice):
        return float(totals_summary(self.stats.totals(choice), self.isthing)["pq"])

    def static_rows(self):
        exit_totals = self.stats.totals()  # (E, C)
        rows = []
        for e, k in enumerate(self.exits):
            s = totals_summary(exit_totals[e], self.isthing)
            rows.append({"exit": k, "pq": float(s["pq"]), "pq_things": float(s["pq_things"]),
                         "pq_stuff": float(s["pq_stuff"]), "encoder_gflops_mean": float(self.costs[e])})
        return rows

    def per_kind(self):
        out = {}
        for kind in self.kinds():
            totals = self.stats.take(self.split.kinds == kind).totals()  # (E, C): summed over the kind's images
            pq = ground_truth_pq(totals)  # over the kind's own categories: a stray prediction adds no zero
            out[kind] = {k: float(pq[e]) for e, k in enumerate(self.exits)}
        return out


class _DetectionScorer(_Scorer):
    """COCO AP (IoU .50:.95) from the table's matching records: a resample counts each image as often as it
    was drawn, which is COCOeval on that many copies of it (eco_ray.metrics.detection.weighted_ap)."""

    metric, parts = "ap", ("ap50", "ap75")

    def _resampled(self, choice):
        n = len(self.split)
        if choice is None:
            return np.stack([self.split.metric_of(np.full(self.weights.shape, e), self.weights)
                             for e in range(len(self.exits))], axis=1)
        return self.split.metric_of(np.broadcast_to(np.asarray(choice)[None], (self.weights.shape[0], n)),
                                    self.weights)

    def point(self, choice):
        return float(self.split.metric_of(np.asarray(choice)[None])[0])

    def static_rows(self):
        static = self.split.static_summaries()
        return [{"exit": k, **{m: static[k][m] for m in (self.metric, *self.parts)},
                 "encoder_gflops_mean": float(self.costs[e])} for e, k in enumerate(self.exits)]

    def per_kind(self):
        out = {}
        for kind in self.kinds():
            sel = self.split.kinds == kind
            out[kind] = {k: self.split.summary_of(np.full(len(self.split), e), images=sel)["ap"]
                         for e, k in enumerate(self.exits)}
        return out


_SCORERS = {"panoptic": _PanopticScorer, "detection": _DetectionScorer}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _ridge_cv(x: np.ndarray, y: np.ndarray, folds: int = 5, alpha: float = 10.0, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions of a ridge regression on standardised inputs (each image predicted by a model
    that never saw it, so its own label noise cannot leak into its prediction)."""
    n = len(y)
    order = np.random.default_rng(seed).permutation(n)
    pred = np.zeros(n)
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
        a = np.hstack([(x[train] - mu) / sd, np.ones((len(train), 1))])
        b = np.hstack([(x[test] - mu) / sd, np.ones((len(test), 1))])
        reg = alpha * np.eye(a.shape[1])
        reg[-1, -1] = 0.0  # the intercept is not shrunk
        w = np.linalg.solve(a.T @ a + reg, a.T @ y[train])
        pred[test] = b @ w
    return pred


def _onehot(values: np.ndarray) -> np.ndarray:
    levels = sorted(set(values.tolist()))
    return np.stack([(values == v).astype(np.float64) for v in levels], 1)


# ------------------------------------------------------------------------------------------ the diagnosis
def diagnose(split, categories: CategorySet | None, encoder_gflops: Sequence[float], *, probe_split=None,
             betas: Sequence[float] = DEFAULT_BETAS, resamples: int = 1000, seed: int = 0,
             gate_choice: np.ndarray | None = None, gate_source: str | None = None, min_lead: float = 0.005,
             target_halfwidth: float = 0.005, tolerance: float = 0.02) -> Diagnosis:
    """Diagnose ``split`` (a derived split with >= 2 views: panoptic, judged on PQ with ``categories``, or
    detection, judged on COCO AP). ``probe_split`` (default: ``split``) is where the probe is cross-validated;
    ``gate_choice`` (exit indices, one per image of ``split``) adds a fitted gate's lead."""
    t0 = time.perf_counter()
    _check(split, "split")
    probe_split = split if probe_split is None else probe_split
    _check(probe_split, "probe split")
    costs = np.asarray(encoder_gflops, np.float64)
    if costs.shape != (len(split.exits),):
        raise DiagnoseError(f"need one encoder GFLOPs value per exit ({len(split.exits)}), got {costs.shape}")
    rel = relative_costs(costs)
    scorer = _SCORERS[getattr(split, "task", "panoptic")](split, categories, costs, resamples, seed)
    q = split.quality_per_view  # (N, V, E)
    static = scorer.static_rows()
    oracle = [scorer.lead(choose(q[:, 0], rel, b), b) for b in betas]
    cross = [scorer.lead(choose(q[:, 1], rel, b), b) for b in betas]

    diff = q[:, 0] - q[:, 1]
    gain = q[:, :, -1:] - q  # (N, V, E): gain of the deepest exit over each exit
    reliability = {int(k): _corr(gain[:, 0, e], gain[:, 1, e]) for e, k in enumerate(split.exits[:-1])}

    probes, ceiling = _probes(probe_split, seed)
    per_kind = scorer.per_kind()

    gate = capture = None
    if gate_choice is not None:
        gate_choice = np.asarray(gate_choice, np.int64)
        if gate_choice.shape != (len(split),):
            raise DiagnoseError(f"gate_choice needs one exit index per image ({len(split)}), got {gate_choice.shape}")
        gate = scorer.lead(gate_choice)
        curve = sorted((scorer_point(scorer, q, rel, b) for b in _CURVE_BETAS), key=lambda p: p[0])
        cv_lead_there = float(np.interp(gate.encoder_gflops_mean, [c for c, _ in curve], [l for _, l in curve]))
        capture = gate.lead / cv_lead_there if cv_lead_there > 1e-9 else None

    verdict, reasons, needed = _verdict(cross, len(split), min_lead, target_halfwidth, scorer.metric.upper())
    reasons.insert(0, f"label noise: {float((np.abs(diff) > tolerance).mean()):.0%} of (image, exit) pairs move more "
                      f"than {tolerance} between the two views; an image's gain from exit {split.exits[0]} to "
                      f"{split.exits[-1]} correlates at {reliability.get(split.exits[0], 0.0):+.2f} between them")
    if probes:
        p = probes[0]
        reasons.append(f"the gate input predicts {p.correlation:+.2f} of one view's gain (ceiling {ceiling:.2f}"
                       + (f": {p.share:.0%} of what is real)" if p.share is not None else ": nothing real to predict)"))
    if gate is not None:
        reasons.append(f"the gate ({gate_source or 'given'}) leads the static line by {gate.lead:+.4f} "
                       f"[{gate.lead_ci95[0]:+.4f}, {gate.lead_ci95[1]:+.4f}] at {gate.encoder_gflops_mean:.4f} "
                       "GFLOPs" + (f", {capture:.0%} of the cross-view oracle's lead there" if capture is not None
                                   else ""))
    return Diagnosis(
        split=split.split, images=len(split), views=list(split.views), exits=[int(k) for k in split.exits],
        encoder_gflops=costs.tolist(), metric=scorer.metric, static=static, oracle=oracle, cross_view_oracle=cross,
        label_noise_share=float((np.abs(diff) > tolerance).mean()),
        label_noise_mean_abs_diff=float(np.abs(diff).mean()), tolerance=tolerance, gain_reliability=reliability,
        probe_split=probe_split.split, probe_images=len(probe_split), probe_ceiling=ceiling, probes=probes,
        per_kind_by_exit=per_kind, gate=gate, gate_source=gate_source, gate_capture=capture, verdict=verdict,
        reasons=reasons, images_for_tight_interval=needed, min_lead=min_lead, target_halfwidth=target_halfwidth,
        resamples=resamples, seconds=round(time.perf_counter() - t0, 3))


def scorer_point(scorer: _Scorer, q: np.ndarray, rel: np.ndarray, beta: float) -> tuple[float, float]:
    """(mean cost, lead) of the cross-view oracle at ``beta``, without the bootstrap."""
    choice = choose(q[:, 1], rel, beta)
    cost = float(scorer.costs[choice].mean())
    line = float(_static_line(scorer.costs, scorer.static_quality[:1], np.asarray([cost]))[0])
    return cost, scorer.point(choice) - line


def _check(split, what: str) -> None:
    if split is None or len(split) == 0:
        raise DiagnoseError(f"the {what} has no images")
    if len(split.views) < 2:
        raise DiagnoseError(f"the {what} {split.split!r} has one view ({split.views}): label noise cannot be told "
                            "from real depth need without a second view; derive with views=[plain, flip]")
    if len(split.exits) < 2:
        raise DiagnoseError(f"the {what} has one exit ({split.exits}): there is no depth to choose")


def _probes(split, seed: int) -> tuple[list[Probe], float]:
    q = split.quality_per_view  # (N, V, E)
    gain = q[:, :, -1] - q[:, :, 0]  # (N, V): deepest over the cheapest exit
    target = gain.mean(1)
    ceiling = math.sqrt(max(_corr(gain[:, 0], gain[:, 1]), 0.0))
    inputs = {"gate input": split.gate_features.astype(np.float64)}
    if len(set(split.kinds.tolist()) - {""}) > 1:
        inputs["kind"] = _onehot(split.kinds)
        inputs["gate input + kind"] = np.hstack([inputs["gate input"], inputs["kind"]])
    if (split.num_objects >= 0).all() and len(set(split.num_objects.tolist())) > 1:
        inputs["objects per image"] = _onehot(split.num_objects)
    if len(split) < 10:
        return [], ceiling
    out = []
    for name, x in inputs.items():
        r = _corr(_ridge_cv(x, target, seed=seed), gain[:, 0])
        out.append(Probe(name, r, r / ceiling if ceiling > 0.05 else None))
    return out, ceiling


def _verdict(cross: list[Lead], n: int, min_lead: float, target_halfwidth: float, metric_label: str = "PQ"
             ) -> tuple[str, list[str], int | None]:
    best = max(cross, key=lambda p: p.lead)
    lo, hi = best.lead_ci95
    line = (f"the cross-view oracle leads the static line by {best.lead:+.4f} [{lo:+.4f}, {hi:+.4f}] at beta "
            f"{best.beta:g} ({best.encoder_gflops_mean:.4f} mean encoder GFLOPs, {n} images)")
    if any(p.lead_ci95[0] > 0 and p.lead >= min_lead for p in cross):
        return "pays", [line + f": real per-image depth need worth at least {min_lead} {metric_label}"], None
    if all(p.lead_ci95[1] < min_lead for p in cross):
        return "does not pay", [line + f"; at every beta the interval lies below {min_lead}: the images do not "
                                       "differ enough in the depth they need"], None
    halfwidth = max((p.lead_ci95[1] - p.lead_ci95[0]) / 2 for p in cross)
    needed = int(math.ceil(n * (halfwidth / target_halfwidth) ** 2)) if halfwidth > target_halfwidth else n
    return "cannot tell yet", [line + f"; about {needed} images would narrow the interval to "
                                      f"+-{target_halfwidth}"], needed
