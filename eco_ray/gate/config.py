"""Step C's settings: one gate fit (kind, trade-off, cost measure, label source, optimiser)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eco_ray.derive.table import COST_MEASURES, QUALITY_MEASURES
from eco_ray.model.gates import GATE_KINDS, canonical_kind


@dataclass
class GateConfig:
    kind: str = "classify"  # classify (the paper's, one beta) | quality (predicts every exit's quality: any beta)
    beta: float = 0.05  # trade-off, in units of the deepest exit's cost (classify: trained for it)
    cost: str = "gflops"  # gflops (encoder GFLOPs) | latency (ms, batch 1, where derived) | layers
    quality: str = "pq"  # label source: pq (per-image PQ, the paper) | dpq (contribution to the dataset PQ)
    lr: float = 0.01
    weight_decay: float = 1e-4
    epochs: int = 300  # full-batch optimiser steps
    hidden: int = 0  # quality gate: hidden units of a one-layer MLP (0 = linear, like the paper's gate)
    class_balance: bool = False  # classify: weight the cross-entropy by inverse label frequency
    seed: int = 0

    def validate(self) -> None:
        self.kind = canonical_kind(self.kind)  # "budget", the quality gate's old name, still reads
        if self.kind not in GATE_KINDS:
            raise ValueError(f"kind must be one of {GATE_KINDS}, got {self.kind!r}")
        if self.quality not in QUALITY_MEASURES:
            raise ValueError(f"quality must be one of {QUALITY_MEASURES}, got {self.quality!r}")
        if self.cost not in COST_MEASURES:
            raise ValueError(f"cost must be one of {COST_MEASURES}, got {self.cost!r}")
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        if self.lr <= 0 or self.weight_decay < 0 or self.epochs < 1 or self.hidden < 0:
            raise ValueError("need lr > 0, weight_decay >= 0, epochs >= 1, hidden >= 0")
