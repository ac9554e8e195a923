"""Step C's settings: one gate fit (kind, trade-off, cost measure, label source, optimiser)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eco_ray.derive._detection import QUALITY_MEASURES as DETECTION_MEASURES
from eco_ray.derive.table import COST_MEASURES, QUALITY_MEASURES
from eco_ray.model.gates import GATE_KINDS, canonical_kind


AUTO_FULL_BATCH = 16384  # rows up to which a fit takes every row at each step by default
AUTO_BATCH = 4096


@dataclass
class GateConfig:
    kind: str = "classify"  # classify (the paper's, one beta) | quality (predicts every exit's quality: any beta)
    beta: float = 0.05  # trade-off, in units of the deepest exit's cost (classify: trained for it)
    cost: str = "gflops"  # gflops (encoder GFLOPs) | latency (ms, batch 1, where derived) | layers
    # label source, null = the table's default: pq (per-image PQ, the paper) | dpq (contribution to the dataset
    # PQ) on a panoptic table; dap (contribution to the dataset AP, the default) | ap on a detection table
    quality: str | None = None
    lr: float = 0.01
    weight_decay: float = 1e-4
    epochs: int = 300  # optimiser steps (over every row, or over batch_size rows each)
    # rows per optimiser step: null = every row up to AUTO_FULL_BATCH rows, else AUTO_BATCH (a step then costs
    # the same at any table size); 0 = always every row
    batch_size: int | None = None
    patience: int = 0  # > 0: stop when the loss on 10% of the rows held out of the steps has not improved for
    #                    this many steps (checked every 10), and keep the best weights (from 10 rows on);
    #                    0 = run every step
    hidden: int = 0  # quality gate: hidden units of a one-layer MLP (0 = linear, like the paper's gate)
    class_balance: bool = False  # classify: weight the cross-entropy by inverse label frequency
    seed: int = 0

    def validate(self) -> None:
        self.kind = canonical_kind(self.kind)  # "budget", the quality gate's old name, still reads
        if self.kind not in GATE_KINDS:
            raise ValueError(f"kind must be one of {GATE_KINDS}, got {self.kind!r}")
        if self.quality is not None and self.quality not in QUALITY_MEASURES + DETECTION_MEASURES:
            raise ValueError(f"quality must be one of {QUALITY_MEASURES + DETECTION_MEASURES}, got {self.quality!r}")
        if self.cost not in COST_MEASURES:
            raise ValueError(f"cost must be one of {COST_MEASURES}, got {self.cost!r}")
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        if self.lr <= 0 or self.weight_decay < 0 or self.epochs < 1 or self.hidden < 0:
            raise ValueError("need lr > 0, weight_decay >= 0, epochs >= 1, hidden >= 0")
        if (self.batch_size is not None and self.batch_size < 0) or self.patience < 0:
            raise ValueError("need batch_size >= 0 (or null) and patience >= 0")

    def effective_batch_size(self, rows: int) -> int:
        if self.batch_size is None:
            return rows if rows <= AUTO_FULL_BATCH else AUTO_BATCH
        return rows if self.batch_size == 0 else min(self.batch_size, rows)
