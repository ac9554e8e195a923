"""Gating networks: from the pooled gate input to an exit per image (Step C trains them).

- ``ExitClassifierGate`` is the paper's gate: one linear layer -> logits over the exits, trained with
  cross-entropy on the exit labels of one beta.
- ``BudgetGate`` predicts the quality q_k of every exit (regression; relative to the deepest exit, which
  removes the per-image difficulty the decision does not depend on). At inference any trade-off picks
  argmax_k q_hat_k - beta * cost_k without retraining, so beta or a compute budget can change per request.

Both decide per image on a batch. Exits are ordered shallow to deep; ties go to the shallower exit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

GATE_KINDS = ("classify", "budget")


class _Standardize(nn.Module):
    """Per-feature (x - mean) / std, fitted on the training features and saved with the gate's weights,
    so that a gate takes the parent's raw pooled features at serving time."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, features: Tensor) -> None:
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ExitClassifierGate(nn.Module):
    kind = "classify"

    def __init__(self, in_dim: int, exits: Sequence[int]):
        super().__init__()
        self.in_dim, self.exits = int(in_dim), [int(k) for k in exits]
        self.norm = _Standardize(self.in_dim)
        self.linear = nn.Linear(self.in_dim, len(self.exits))

    def forward(self, gate_features: Tensor) -> Tensor:
        return self.linear(self.norm(gate_features))  # (B, num_exits) logits

    @torch.no_grad()
    def decide(self, gate_features: Tensor) -> Tensor:
        """(B, d) -> (B,) exit depths (not indices)."""
        index = self.forward(gate_features).argmax(-1)  # argmax returns the first max: the shallower exit
        return torch.as_tensor(self.exits, device=index.device)[index]

    def spec(self) -> dict:
        return {"kind": self.kind, "in_dim": self.in_dim, "exits": self.exits}


class BudgetGate(nn.Module):
    kind = "budget"

    def __init__(self, in_dim: int, exits: Sequence[int], hidden: int = 0):
        super().__init__()
        self.in_dim, self.exits, self.hidden = int(in_dim), [int(k) for k in exits], int(hidden)
        n = len(self.exits)
        self.norm = _Standardize(self.in_dim)
        self.net = nn.Linear(self.in_dim, n) if hidden <= 0 else \
            nn.Sequential(nn.Linear(self.in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n))

    def forward(self, gate_features: Tensor) -> Tensor:
        # (B, num_exits): predicted per-image quality of each exit relative to the deepest exit's; the
        # decision argmax_k q_k - beta * c_k does not change when a per-image constant is subtracted
        return self.net(self.norm(gate_features))

    @torch.no_grad()
    def decide(self, gate_features: Tensor, beta: float | Tensor, costs: Sequence[float] | Tensor) -> Tensor:
        """Exit maximising q_hat_k - beta * cost_k; ``beta`` is a scalar or one value per image."""
        q = self.forward(gate_features)
        costs = torch.as_tensor(costs, dtype=q.dtype, device=q.device)
        if costs.shape != (len(self.exits),):
            raise ValueError(f"need one cost per exit ({len(self.exits)}), got shape {tuple(costs.shape)}")
        beta = torch.as_tensor(beta, dtype=q.dtype, device=q.device).reshape(-1, 1)
        index = (q - beta * costs).argmax(-1)
        return torch.as_tensor(self.exits, device=index.device)[index]

    def spec(self) -> dict:
        return {"kind": self.kind, "in_dim": self.in_dim, "exits": self.exits, "hidden": self.hidden}


def build_gate(spec: dict) -> nn.Module:
    kind = spec.get("kind")
    if kind == "classify":
        return ExitClassifierGate(spec["in_dim"], spec["exits"])
    if kind == "budget":
        return BudgetGate(spec["in_dim"], spec["exits"], spec.get("hidden", 0))
    raise ValueError(f"unknown gate kind {kind!r}; known: {GATE_KINDS}")
