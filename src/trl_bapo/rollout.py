"""The delayed rollout policy alpha = pi_{theta_{t-v}} (Algorithm 1, lines 3-6).

The snapshot holds this process's share of the trainable parameters only (the adapter weights under PEFT; a shard
under FSDP2 or ZeRO-3, see `trl_bapo.engines`), in CPU memory, taken on refresh steps. Generation with alpha swaps
the snapshot with the trained weights, one tensor at a time, and swaps them back afterwards: no second model sits
on the accelerator, and TRL's own generation path (including `unwrap_model_for_generation`) runs unchanged. With
vLLM the engine generates with alpha, and the snapshot is what the engine is sent again when it lost alpha (a
restarted engine, an evaluation), and what the trainer measures alpha's log-probs with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from trl_bapo.engines import check_swappable, host_copy, local_shard, release_gathered, trainable_parameters


class RolloutSnapshot:
    """alpha: refreshed from the policy when (t - phase) mod v == 0 (and at the first rollout step)."""

    def __init__(self, delay: int, phase: int = 0):
        self.delay, self.phase = delay, phase
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def maybe_refresh(self, model: nn.Module, step: int) -> bool:
        """Copies the policy into the snapshot when `step` is a refresh step; returns whether it did."""
        if not self.will_refresh(step):
            return False
        self.step = step
        # With v = 1 the snapshot is always the live policy: nothing to copy.
        if self.delay == 1:
            return True
        if not self.weights:
            check_swappable(model)
        release_gathered(model)
        for name, param in trainable_parameters(model).items():
            if name in self.weights:
                self.weights[name].copy_(local_shard(param))
            else:
                self.weights[name] = host_copy(local_shard(param))
        return True

    def will_refresh(self, step: int) -> bool:
        """Whether rollout step `step` takes a new alpha."""
        return self.step is None or (step - self.phase) % self.delay == 0

    def lag(self, step: int) -> int:
        """Rollout steps since the snapshot was taken (0 on refresh steps)."""
        return step - self.step

    def state_dict(self) -> dict:
        return {"step": self.step, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.weights = {name: host_copy(tensor) for name, tensor in state["weights"].items()}

    def num_elements(self) -> int:
        return sum(tensor.numel() for tensor in self.weights.values())

    @contextmanager
    def applied(self, model: nn.Module, step: int) -> Iterator[None]:
        """Runs the block with the snapshot's weights in `model`, then puts the trained weights back."""
        if self.lag(step) == 0 or not self.weights:
            yield
            return
        self._swap(model)
        try:
            yield
        finally:
            self._swap(model)

    @torch.no_grad()
    def _swap(self, model: nn.Module) -> None:
        # Exchanges the snapshot with the model's weights in place; swapping twice restores both exactly.
        release_gathered(model)
        for name, param in trainable_parameters(model).items():
            shard, stored = local_shard(param), self.weights[name]
            held = shard.clone()
            shard.copy_(stored)
            stored.copy_(held)
