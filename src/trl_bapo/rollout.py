"""The delayed rollout policy alpha = pi_{theta_{t-v}} (Algorithm 1, lines 3-6).

The snapshot holds a copy of the trainable parameters only (the adapter weights under PEFT), taken on refresh
steps. With vLLM the engine itself holds alpha: it receives weights only on refresh steps, and the snapshot
keeps just the schedule. Generation with alpha swaps the snapshot into the live model for the duration of the rollout and swaps
the trained weights back afterwards, so no second model is kept in memory and TRL's own generation path
(including `unwrap_model_for_generation`) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


class RolloutSnapshot:
    """alpha: refreshed from the policy when t mod v == 0 (and at the first rollout step)."""

    def __init__(self, delay: int):
        self.delay = delay
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def maybe_refresh(self, model: nn.Module, step: int, keep_weights: bool = True) -> bool:
        """Copies the policy into the snapshot when `step` is a refresh step; returns whether it did.

        `keep_weights=False` only keeps the schedule, for an engine (vLLM) that holds alpha's weights itself."""
        if self.step is not None and step % self.delay != 0:
            return False
        self.step = step
        # With v = 1 the snapshot is always the live policy: nothing to copy.
        self.weights = {}
        if self.delay > 1 and keep_weights:
            self.weights = {name: param.detach().clone() for name, param in trainable_parameters(model).items()}
        return True

    def lag(self, step: int) -> int:
        """Rollout steps since the snapshot was taken (0 on refresh steps)."""
        return step - self.step

    def state_dict(self) -> dict:
        return {"delay": self.delay, "step": self.step, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.delay, self.step, self.weights = state["delay"], state["step"], state["weights"]

    def num_elements(self) -> int:
        return sum(tensor.numel() for tensor in self.weights.values())

    @contextmanager
    def applied(self, model: nn.Module, step: int) -> Iterator[None]:
        """Runs the block with the snapshot's weights in `model`, then restores the trained weights."""
        if self.lag(step) == 0 or not self.weights:
            yield
            return
        params = trainable_parameters(model)
        trained = {name: params[name].detach().clone() for name in self.weights}
        with torch.no_grad():
            for name, tensor in self.weights.items():
                params[name].copy_(tensor)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, tensor in trained.items():
                    params[name].copy_(tensor)
