"""Step C: fit a gate on the cached gate inputs of the derived table (plain torch, seconds on a CPU).

Costs are relative to the deepest exit (c_k / c_K, see eco_ray/derive/table.py), so beta means the same
whatever the cost measure: the per-image PQ one would give up to save the deepest exit's whole cost.

- ``classify`` (the paper's gate): labels argmax_k q_k - beta * c_k for ONE beta, cross-entropy.
- ``quality``: regression of every exit's quality relative to the deepest exit (q_k - q_K); one fit
  serves every beta (and a per-request budget), decided by the same rule over the predicted qualities.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from eco_ray.gate.config import GateConfig
from eco_ray.model.gates import ExitClassifierGate, QualityGate
from eco_ray.tradeoff import exit_labels


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
        gate = QualityGate(x.shape[1], exits, cfg.hidden)
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
