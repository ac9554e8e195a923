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
    # a memory-mapped table's features are read-only: torch gets a private copy of those
    x = torch.as_tensor(np.require(features, np.float32, "W"))
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
    with torch.no_grad():
        xn = gate.norm(x)  # standardised once: every step then runs the head alone (the same values)
    head = gate.linear if cfg.kind == "classify" else gate.net
    rows = _batches(len(xn), cfg)
    val_rows = None
    if cfg.patience > 0 and len(xn) >= 10:  # early stopping judges on rows the steps never see
        order = torch.randperm(len(xn), generator=torch.Generator().manual_seed(cfg.seed + 1))
        n_val = max(1, len(xn) // 10)
        val_rows, fit_rows = order[:n_val], order[n_val:]
        rows = _batches(len(fit_rows), cfg, fit_rows)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    gate.train()
    best, best_state, since_best = float("inf"), None, 0
    for step in range(cfg.epochs):
        idx = next(rows)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(head(xn if idx is None else xn[idx]), target if idx is None else target[idx])
        loss.backward()
        opt.step()
        if val_rows is not None and (step + 1) % EARLY_STOP_EVERY == 0:
            with torch.no_grad():
                val_loss = float(loss_fn(head(xn[val_rows]), target[val_rows]))
            if val_loss < best - 1e-6:
                best, best_state, since_best = val_loss, {k: v.clone() for k, v in head.state_dict().items()}, 0
            else:
                since_best += EARLY_STOP_EVERY
                if since_best >= cfg.patience:
                    break
    gate.eval()
    gate.final_loss = float(loss.detach())
    if best_state is not None:
        head.load_state_dict(best_state)
        gate.final_loss = best  # the kept weights' loss on the held-out rows
    gate.steps = step + 1
    return gate


EARLY_STOP_EVERY = 10  # optimiser steps between two checks of the early-stopping loss


def _batches(n: int, cfg: GateConfig, pool: torch.Tensor | None = None):
    """Row indices per optimiser step: None (every row) for a full-batch fit, else shuffled mini-batches of
    ``cfg.effective_batch_size(n)`` rows, epoch after epoch."""
    size = cfg.effective_batch_size(n)
    if size >= n and pool is None:
        while True:
            yield None
    pool = torch.arange(n) if pool is None else pool
    gen = torch.Generator().manual_seed(cfg.seed)
    while True:
        order = pool[torch.randperm(len(pool), generator=gen)]
        for start in range(0, len(order), size):
            yield order[start:start + size]
