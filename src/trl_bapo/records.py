"""What one rollout step of Algorithm 1 produces on its way to the training batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ScoredRollout:
    """One call of TRL's generation and scoring: this process's rows, and for every process's completions the
    advantages TRL gave them, whether each is correct, and the dataset rows they answer; and the seconds it took."""

    rows: dict[str, Any]
    advantages: torch.Tensor
    correct: torch.Tensor
    examples: list[dict[str, Any]]
    seconds: float = 0.0


@dataclass
class FreshRollout:
    """X_on of one rollout step, gathered from every process, with what Algorithm 1 decides for each group."""

    rows: dict[str, Any]
    examples: list[dict[str, Any]]  # the dataset row of each completion
    accuracy: torch.Tensor  # mu per group
    x1: torch.Tensor  # kept by the online filter (line 11)
    kept: torch.Tensor  # whose rows the buffers keep for replay (B_high's; with the shared buffer, every entry's)
    c2: float  # the thresholds of eq. 8 at this step
    c3: float
    lag: int  # steps since alpha was taken


@dataclass
class Replay:
    """X2 or X3 of one rollout step: its rows (in parts), its number of groups, for X2 the number of B_bad's
    prompts re-evaluated to find them, and for X3 each group's policy lag (rollout steps)."""

    parts: list[dict[str, Any]]
    groups: int
    reevaluated: int = 0
    lags: list[int] = field(default_factory=list)
