"""The optimizer steps of an empty assembled batch, which must leave the weights where they are."""

from __future__ import annotations

from transformers import TrainerCallback


class FrozenStep(TrainerCallback):
    """Keeps the optimizer steps of an empty assembled batch from moving the weights.

    A zero gradient still moves them through Adam's momentum and weight decay, so those steps run at learning rate
    0, set through the optimizer's `param_groups`, which every engine's optimizer exposes (DeepSpeed's ZeRO
    optimizers included). The trainer calls `hold` before each micro-batch's backward pass, where DeepSpeed takes
    its step; the rate comes back right after the step, before the scheduler reads it, unless an engine's own
    scheduler has already set a new one.
    """

    def __init__(self):
        self._rates: list[float] | None = None

    def hold(self, optimizer) -> None:
        if self._rates is None:
            self._rates = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._rates is None:
            return
        for group, rate in zip(optimizer.param_groups, self._rates):
            if group["lr"] == 0.0:
                group["lr"] = rate
        self._rates = None
