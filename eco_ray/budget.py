"""The one budget type: a limit on one metric, absolute or relative to full depth (Ray-free).

Every place that speaks of a budget uses it: the sweep's Optuna constraint, selection from a sweep, the
pipeline's select stage and a served request's compute cap. Its names on the command line and in configs:

    max_gflops=X            mean (selection) or per-image (serving) encoder GFLOPs at most X
    max_relative_gflops=F   the same, as a share F of the full-depth encoder GFLOPs (0.7 = save 30%)
    max_latency_ms=Y        latency in ms at most Y (batch 1, measured where the table was derived)
    max_relative_latency=F  the same, as a share of the full-depth latency
    min_pq=Z                PQ at least Z (selection: then the cheapest such point)
    min_ap=Z                COCO AP at least Z (a detector's gates; selection as min_pq)

A point is anything with the evaluation keys (``pq`` or ``ap``, ``encoder_gflops_mean``, ``latency_ms_mean``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from eco_ray.errors import EcoRayError

# metric -> (the key it reads in an evaluated point, the cost measure of the derived table, unit)
METRICS = {"encoder_gflops": ("encoder_gflops_mean", "gflops", "mean encoder GFLOPs"),
           "latency_ms": ("latency_ms_mean", "latency", "ms mean latency"),
           "pq": ("pq", None, "PQ"), "ap": ("ap", None, "AP")}
QUALITY = ("pq", "ap")  # the metrics a budget sets a lower limit on
NAMES = {"max_gflops": ("encoder_gflops", False), "max_relative_gflops": ("encoder_gflops", True),
         "max_latency_ms": ("latency_ms", False), "max_relative_latency": ("latency_ms", True),
         "min_pq": ("pq", False), "min_ap": ("ap", False)}


class BudgetError(EcoRayError):
    """A budget that cannot be used (unknown name, bad limit); the message names it."""


@dataclass(frozen=True)
class Budget:
    metric: str  # encoder_gflops | latency_ms (upper limits) | pq | ap (lower limits)
    limit: float
    relative: bool = False  # limit as a share of the full-depth value (costs only)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise BudgetError(f"budget metric must be one of {list(METRICS)}, got {self.metric!r}")
        if self.relative and self.metric in QUALITY:
            raise BudgetError(f"a {self.metric.upper()} budget cannot be relative to full depth: use min_{self.metric}")
        if not (isinstance(self.limit, (int, float)) and math.isfinite(self.limit)) or self.limit < 0:
            raise BudgetError(f"{self.name} must be a finite number >= 0, got {self.limit!r}")
        if self.relative and not 0 < self.limit <= 1:
            raise BudgetError(f"{self.name} must be a share in (0, 1] of the full-depth cost, got {self.limit}")

    @classmethod
    def named(cls, name: str, limit: float) -> Budget:
        """``Budget.named("max_gflops", 0.05)``: the command-line and config spelling."""
        if name not in NAMES:
            raise BudgetError(f"budget must be one of {list(NAMES)}, got {name!r}")
        metric, relative = NAMES[name]
        try:
            value = float(limit)
        except (TypeError, ValueError):
            raise BudgetError(f"{name}={limit!r} is not a number") from None
        return cls(metric, value, relative)

    @property
    def name(self) -> str:
        return next(n for n, spec in NAMES.items() if spec == (self.metric, self.relative))

    @property
    def key(self) -> str:
        """The key of an evaluated point that the budget reads."""
        return METRICS[self.metric][0]

    @property
    def cost_measure(self) -> str | None:
        """The derived table's cost measure behind the metric (``gflops``, ``latency``), None for PQ or AP."""
        return METRICS[self.metric][1]

    @property
    def is_lower_limit(self) -> bool:
        return self.metric in QUALITY

    def absolute(self, full_depth: float | None = None) -> Budget:
        """The budget in absolute units; a relative one needs the full-depth value of its metric."""
        if not self.relative:
            return self
        if full_depth is None or not full_depth > 0:
            raise BudgetError(f"{self.name} needs the full-depth {self.metric} to become absolute")
        return Budget(self.metric, self.limit * full_depth, False)

    def violation(self, point: dict) -> float:
        """<= 0 when ``point`` meets the budget (Optuna's constraint convention), else by how much it misses."""
        self._require_absolute()
        value = float(point[self.key])
        return self.limit - value if self.is_lower_limit else value - self.limit

    def admits(self, point: dict, tolerance: float = 1e-12) -> bool:
        return self.violation(point) <= tolerance

    def admits_value(self, value: float, tolerance: float = 1e-12) -> bool:
        """For one cost value (e.g. an exit's encoder GFLOPs under a per-request cap)."""
        return self.violation({self.key: value}) <= tolerance

    def describe(self) -> str:
        op = ">=" if self.is_lower_limit else "<="
        return f"{self.key} {op} {self.limit:g}" + (" x full depth" if self.relative else "")

    def __str__(self) -> str:
        return f"{self.name}={self.limit:g}"

    def _require_absolute(self) -> None:
        if self.relative:
            raise BudgetError(f"{self}: make a relative budget absolute (Budget.absolute) before applying it")
