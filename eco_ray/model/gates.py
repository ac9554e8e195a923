"""Gating networks: from the pooled gate input to a score per exit (Step C trains them).

- ``ExitClassifierGate`` is the paper's gate: one linear layer -> logits over the exits, trained with
  cross-entropy on the exit labels of one beta; its scores are those logits and its decision ignores beta.
- ``QualityGate`` predicts the quality q_k of every exit (regression; relative to the deepest exit, which
  removes the per-image difficulty the decision does not depend on). Any trade-off then picks
  argmax_k q_hat_k - beta * cost_k without retraining, so beta or a compute budget can change per request.
  (Saved gates of the old kind name ``budget`` load as this class.)

Both score a batch per image; :func:`decide` turns scores into exits with the one decision rule,
``eco_ray.tradeoff.choose`` (exits ordered shallow to deep, ties to the shallower exit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from eco_ray.tradeoff import choose

GATE_KINDS = ("classify", "quality")
LEGACY_KINDS = {"budget": "quality"}  # the quality gate's name in configs and saved gates written before


def canonical_kind(kind: str) -> str:
    return LEGACY_KINDS.get(kind, kind)


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
    uses_beta = False  # trained for one beta: its decision does not take one

    def __init__(self, in_dim: int, exits: Sequence[int]):
        super().__init__()
        self.in_dim, self.exits = int(in_dim), [int(k) for k in exits]
        self.norm = _Standardize(self.in_dim)
        self.linear = nn.Linear(self.in_dim, len(self.exits))

    def forward(self, gate_features: Tensor) -> Tensor:
        return self.linear(self.norm(gate_features))  # (B, num_exits) logits

    def spec(self) -> dict:
        return {"kind": self.kind, "in_dim": self.in_dim, "exits": self.exits}


class QualityGate(nn.Module):
    kind = "quality"
    uses_beta = True

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

    def spec(self) -> dict:
        return {"kind": self.kind, "in_dim": self.in_dim, "exits": self.exits, "hidden": self.hidden}


@torch.no_grad()
def gate_scores(gate: nn.Module, features) -> np.ndarray:
    """(B, d) features -> (B, num_exits) scores: a classifier's logits, a quality gate's predicted quality."""
    x = torch.as_tensor(np.require(features, np.float32, "W") if not isinstance(features, Tensor) else features,
                        dtype=torch.float32)  # read-only (memory-mapped) features are copied
    return gate(x).double().cpu().numpy()


def decide(gate: nn.Module, features, relative_cost: Sequence[float], beta: float | np.ndarray = 0.0,
           allowed: np.ndarray | None = None) -> np.ndarray:
    """Exit index per image: :func:`eco_ray.tradeoff.choose` over the gate's scores. ``relative_cost`` is
    the cost measure the gate was fitted with (c_k / c_K); a classifier ignores ``beta``."""
    beta = beta if gate.uses_beta else 0.0
    return choose(gate_scores(gate, features), relative_cost, beta, allowed)


def build_gate(spec: dict) -> nn.Module:
    kind = canonical_kind(spec.get("kind"))
    if kind == "classify":
        return ExitClassifierGate(spec["in_dim"], spec["exits"])
    if kind == "quality":
        return QualityGate(spec["in_dim"], spec["exits"], spec.get("hidden", 0))
    raise ValueError(f"unknown gate kind {spec.get('kind')!r}; known: {GATE_KINDS}")
