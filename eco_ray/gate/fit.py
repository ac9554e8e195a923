"""Step C: fit a gate on the cached gate inputs of the derived table (plain torch, seconds on a CPU).

Costs are relative to the deepest exit (c_k / c_K, see eco_ray/derive/table.py), so beta means the same
whatever the cost measure: the per-image PQ one would give up to save the deepest exit's whole cost.

- ``classify`` (the paper's gate): labels argmax_k q_k - beta * c_k for ONE beta, cross-entropy.
- ``budget``: regression of every exit's quality relative to the deepest exit (q_k - q_K); one fit
  serves every beta (and a per-request budget), decided by argmax_k q_hat_k - beta * c_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from eco_ray.derive.table import QUALITY_MEASURES
from eco_ray.model.gates import GATE_KINDS, BudgetGate, ExitClassifierGate
from eco_ray.tradeoff import exit_labels

COSTS = ("gflops", "latency", "layers")


@dataclass
class GateConfig:
    kind: str = "classify"  # classify (one beta) | budget (any beta)
    beta: float = 0.05  # trade-off, in units of the deepest exit's cost (classify: trained for it)
    cost: str = "gflops"  # gflops (encoder GFLOPs) | latency (ms, batch 1, this machine) | layers
    quality: str = "pq"  # label source: pq (per-image PQ, the paper) | dpq (contribution to the dataset PQ)
    lr: float = 0.01
    weight_decay: float = 1e-4
    epochs: int = 300  # full-batch optimiser steps
    hidden: int = 0  # budget gate: hidden units of a one-layer MLP (0 = linear, like the paper's gate)
    class_balance: bool = False  # classify: weight the cross-entropy by inverse label frequency
    seed: int = 0

    def validate(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"kind must be one of {GATE_KINDS}, got {self.kind!r}")
        if self.quality not in QUALITY_MEASURES:
            raise ValueError(f"quality must be one of {QUALITY_MEASURES}, got {self.quality!r}")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost!r}")
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        if self.lr <= 0 or self.weight_decay < 0 or self.epochs < 1 or self.hidden < 0:
            raise ValueError("need lr > 0, weight_decay >= 0, epochs >= 1, hidden >= 0")


def fit_gate(features: np.ndarray, quality: np.ndarray, rel_costs: np.ndarray, exits: list[int],
             cfg: GateConfig) -> nn.Module:
    """A trained gate from (N, d) features and (N, E) per-image quality; deterministic for ``cfg.seed``."""
    cfg.validate()
    if len(features) != len(quality) or len(features) == 0:
        raise ValueError(f"need the same positive number of feature rows and quality rows, got {len(features)} "
                         f"and {len(quality)}")
    torch.manual_seed(cfg.seed)
    x = torch.as_tensor(features, dtype=torch.float32)
    if cfg.kind == "classify":
        gate = ExitClassifierGate(x.shape[1], exits)
        labels = torch.as_tensor(exit_labels(quality, rel_costs, cfg.beta), dtype=torch.long)
        weight = None
        if cfg.class_balance:
            counts = torch.bincount(labels, minlength=len(exits)).float()
            weight = torch.where(counts > 0, counts.sum() / (len(exits) * counts.clamp_min(1)), torch.zeros(()))
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        target = labels
    else:
        gate = BudgetGate(x.shape[1], exits, cfg.hidden)
        q = torch.as_tensor(quality, dtype=torch.float32)
        target = q - q[:, -1:]
        loss_fn = nn.MSELoss()
    gate.norm.fit(x)
    opt = torch.optim.AdamW([p for p in gate.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    gate.train()
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(gate(x), target)
        loss.backward()
        opt.step()
    gate.eval()
    gate.final_loss = float(loss.detach())
    return gate


@torch.no_grad()
def gate_choice(gate: nn.Module, features: np.ndarray, rel_costs: np.ndarray, beta: float) -> np.ndarray:
    """Exit index chosen per image (``beta`` only matters to a budget gate)."""
    x = torch.as_tensor(features, dtype=torch.float32)
    if isinstance(gate, BudgetGate):
        depth = gate.decide(x, beta, torch.as_tensor(rel_costs, dtype=torch.float32))
    else:
        depth = gate.decide(x)
    index = {k: i for i, k in enumerate(gate.exits)}
    return np.asarray([index[int(k)] for k in depth.tolist()], dtype=np.int64)
