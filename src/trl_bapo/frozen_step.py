"""The optimizer steps BAPO skips: those of an empty assembled batch, and with `batch_aggregation="mini_batch"` the
steps an underfilled batch has no mini-batch for. A skipped step must leave the weights and the optimizer's state
where they are."""

from __future__ import annotations

from transformers import TrainerCallback


class FrozenStep(TrainerCallback):
    """Makes the optimizer step after `hold` a step that changes nothing.

    The Trainer still calls the optimizer (and the scheduler, which advances as it does for every step). Right
    before the step, every gradient is dropped: torch's optimizers skip a parameter whose gradient is None, so the
    weights, Adam's moments and its step count stay as they were, as if no step had been taken. DeepSpeed's ZeRO
    optimizers step inside the backward pass and keep their gradients to themselves: there the step runs at learning
    rate 0, set through the optimizer's `param_groups` before each micro-batch's backward pass, which leaves the
    weights in place (the moments still decay). The rate comes back right after the step, before the scheduler reads
    it, unless an engine's own scheduler has already set a new one.
    """

    def __init__(self):
        self._rates: list[float] | None = None

    def hold(self, optimizer) -> None:
        if self._rates is None:
            self._rates = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._rates is None:
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._rates is None:
            return
        for group, rate in zip(optimizer.param_groups, self._rates):
            if group["lr"] == 0.0:
                group["lr"] = rate
        self._rates = None
