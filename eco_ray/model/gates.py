"""Gating networks: from the pooled gate input to an exit per image (Step C trains them).

- ``ExitClassifierGate`` is the paper's gate: one linear layer -> logits over the exits, trained with
  cross-entropy on the exit labels of one beta.
- ``BudgetGate`` predicts the quality q_k of every exit (regression). At inference any trade-off picks
  argmax_k q_hat_k - beta * cost_k without retraining, so beta or a compute budget can change per request.

Both decide per image on a batch. Exits are ordered shallow to deep; ties go to the shallower exit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

GATE_KINDS = ("classify", "budget")


class ExitClassifierGate(nn.Module):
    kind = "classify"

    def __init__(self, in_dim: int, exits: Sequence[int]):
        super().__init__()
        self.in_dim, self.exits = int(in_dim), [int(k) for k in exits]
        self.linear = nn.Linear(self.in_dim, len(self.exits))

    def forward(self, gate_features: Tensor) -> Tensor:
        return self.linear(gate_features)  # (B, num_exits) logits

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
        self.net = nn.Linear(self.in_dim, n) if hidden <= 0 else \
            nn.Sequential(nn.Linear(self.in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n))

    def forward(self, gate_features: Tensor) -> Tensor:
        return self.net(gate_features)  # (B, num_exits) predicted quality per exit

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
