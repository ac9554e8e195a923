"""Typed results: what an evaluation, a gate fit and a sweep return, with ``to_json()`` for files, MLflow and
``--json`` (Ray-free). Exit histograms are keyed by the exit (an int) in Python; JSON makes the keys strings,
and ``from_json`` turns them back once, here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

# the numeric figures of an operating point that trials report, MLflow logs and budgets read: a segmenter's
# PQ and its parts, or a detector's COCO AP and its parts, then the costs
QUALITY_METRICS = {"pq": ("pq", "pq_things", "pq_stuff", "sq", "rq", "miou"), "ap": ("ap", "ap50", "ap75")}
COST_METRICS = ("encoder_gflops_mean", "encoder_gflops_p95", "latency_ms_mean", "latency_ms_p95", "layers_mean",
                "layers_p95")
METRICS = (*QUALITY_METRICS["pq"], *QUALITY_METRICS["ap"], *COST_METRICS)


@dataclass
class OperatingPoint:
    """A per-image exit assignment evaluated exactly on a split: quality, cost, and where the images went.

    The quality is the task's: PQ (with things, stuff, SQ, RQ, mIoU) for a segmenter, COCO AP (with AP50,
    AP75) for a detector; the other task's fields stay None."""

    encoder_gflops_mean: float
    encoder_gflops_p95: float
    layers_mean: float
    layers_p95: float
    exit_histogram: dict[int, int]
    pq: float | None = None
    pq_things: float | None = None
    pq_stuff: float | None = None
    sq: float | None = None
    rq: float | None = None
    miou: float | None = None
    ap: float | None = None
    ap50: float | None = None
    ap75: float | None = None
    latency_ms_mean: float | None = None  # None where the table has no measured latency
    latency_ms_p95: float | None = None
    exit: int | None = None  # a static-depth point: every image at this exit
    beta: float | None = None  # a gate's or an oracle's trade-off
    picked_on: str | None = None  # the cross-view oracle: the view the exits were picked on

    @property
    def metric(self) -> str:
        """``pq`` or ``ap``: which quality this point has."""
        return "pq" if self.pq is not None else "ap"

    @property
    def quality(self) -> float:
        """The point's headline quality: PQ, or AP for a detector."""
        return float(self.pq if self.pq is not None else self.ap)

    def metrics(self) -> dict[str, float]:
        """The numeric figures that are set (a point without latency has no latency key)."""
        return {k: float(getattr(self, k)) for k in METRICS if getattr(self, k) is not None}

    def cost(self, key: str) -> float:
        value = getattr(self, key)
        if value is None:
            raise KeyError(f"{key} was not measured for this point")
        return float(value)

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["exit_histogram"] = {int(k): int(v) for k, v in self.exit_histogram.items()}
        return out

    @classmethod
    def from_json(cls, doc: dict) -> OperatingPoint:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        values["exit_histogram"] = {int(k): int(v) for k, v in doc.get("exit_histogram", {}).items()}
        return cls(**values)


def static_at(static: list[OperatingPoint], cost: float, key: str = "encoder_gflops_mean") -> float:
    """The quality (PQ or AP) of the static-depth curve at ``cost`` (linear between exits): the equal-compute
    baseline."""
    pts = sorted(static, key=lambda p: p.cost(key))
    return float(np.interp(cost, [p.cost(key) for p in pts], [p.quality for p in pts]))


@dataclass
class GateEvaluation:
    """One trade-off beta: the gate's decisions and the oracle's, on the eval split and (when the fit held
    images out) on the held-out training images."""

    beta: float
    gate: OperatingPoint
    oracle: OperatingPoint
    holdout_gate: OperatingPoint | None = None
    holdout_oracle: OperatingPoint | None = None

    def to_json(self) -> dict:
        out = {"beta": self.beta, "gate": self.gate.to_json(), "oracle": self.oracle.to_json()}
        if self.holdout_gate is not None:
            out["holdout"] = {"gate": self.holdout_gate.to_json(), "oracle": self.holdout_oracle.to_json()}
        return out


@dataclass
class FitResult:
    """A gate fit (once for a quality gate, once per beta for a classifier) and its exact evaluation."""

    kind: str
    cost: str
    relative_costs: list[float]
    evaluations: list[GateEvaluation]
    static: list[OperatingPoint]  # on the eval split
    gates: dict  # beta -> the fitted module (a quality gate: one module under the first beta)
    fit_seconds: float
    eval_seconds: float
    train_images: int
    eval_images: int
    static_holdout: list[OperatingPoint] | None = None
    holdout_images: int = 0

    def gate_for(self, beta: float):
        return self.gates[beta] if beta in self.gates else next(iter(self.gates.values()))

    def evaluation_json(self, evaluation: GateEvaluation) -> dict:
        """The ``eco-ray gate --json`` shape of one beta: ``{"beta", "kind", "cost", "gate", "static", "oracle"}``."""
        return {"beta": evaluation.beta, "kind": self.kind, "cost": self.cost, "gate": evaluation.gate.to_json(),
                "static": [p.to_json() for p in self.static], "oracle": evaluation.oracle.to_json()}


@dataclass
class TrialRecord:
    """One trial of a sweep as the study and the trial's result file know it."""

    number: int
    state: str
    params: dict
    interrupted: bool = False
    metrics: dict[str, float] | None = None
    feasible: bool | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("metrics", "feasible")}


@dataclass
class SweepSummary:
    """A sweep's trials, its Pareto front (feasible complete trials) and the baselines, on the split the trials
    were selected on (``static`` / ``oracle``) and on the eval split (``static_val`` / ``oracle_val``)."""

    name: str
    study_name: str
    storage: str  # shown with any password masked
    objective_cost: str
    constraints: dict[str, float]
    trials: list[TrialRecord]
    front: list[dict]  # {"number", "params", **metrics}
    selection_split: dict
    eval_split: dict
    static: list[OperatingPoint]  # on the split the trials were selected on
    oracle: list[OperatingPoint]
    static_val: list[OperatingPoint]  # on the eval split
    oracle_val: list[OperatingPoint]
    run_id: str = ""
    tracking_uri: str = ""
    seconds: float = 0.0
    path: str = ""
    plot: str = ""
    trials_run_now: int = 0
    interrupted_trials_closed: int = 0
    trials_per_minute: float | None = None
    metric: str = "pq"  # the quality objective: pq, or ap on a detector's table
    extra: dict = field(default_factory=dict)

    @property
    def complete(self) -> int:
        return sum(t.metrics is not None for t in self.trials)

    @property
    def feasible(self) -> int:
        return sum(bool(t.feasible) for t in self.trials if t.metrics is not None)

    @property
    def failed(self) -> int:
        return sum(t.state == "FAIL" and not t.interrupted for t in self.trials)

    def to_json(self, with_trials: bool = True) -> dict:
        points = ("static", "oracle", "static_val", "oracle_val")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("trials", *points)}
        out.update({k: [p.to_json() for p in getattr(self, k)] for k in points})
        out.update({"complete": self.complete, "feasible": self.feasible, "failed": self.failed})
        if with_trials:
            out["trials"] = [t.to_json() for t in self.trials]
        return out


@dataclass
class Selection:
    """A gate chosen from a sweep under a budget, registered, and the alias moved to it."""

    sweep: str
    budget: str  # e.g. "max_gflops=0.0708"
    chosen: dict  # the trial's metrics (selection split) and val_* metrics, params, run id
    why: str
    registered_model: str
    version: int | str  # as the registry's store reports it
    alias: str
    model_uri: str
    candidates: int
    tracking_uri: str
    selected_at: str

    def to_json(self) -> dict:
        return asdict(self)
