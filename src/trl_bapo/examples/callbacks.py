"""A console view of BAPO at work: one line per logged step with the batch composition and buffers, and the
libraries kept quiet around it; and the benchmarks' step clock."""

from __future__ import annotations

import os
import time
import warnings

import torch
from transformers import TrainerCallback


def quiet_libraries() -> None:
    """Silences what the libraries print on every run (deprecation warnings, weight-loading bars, DeepSpeed's
    accelerator guess on CPU), so that a console run shows BAPO's own lines. Call it before training starts."""
    import datasets
    import transformers

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns that it guessed the CPU
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()


class CompositionPrinter(TrainerCallback):
    """Prints reward, X1/X2/X3 against the configured batch, buffer sizes, thresholds and rollouts spent."""

    def __init__(self, batch_groups: int):
        self.batch_groups = batch_groups
        self.header_printed = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "bapo/x1" not in logs or not state.is_world_process_zero:
            return
        if not self.header_printed:
            print(
                f"{'step':>5} {'reward':>7} {'X1':>4} {'X2':>4} {'X3':>4} {'/B':>4} "
                f"{'B_bad':>6} {'B_high':>6} {'c2':>5} {'c3':>5} {'lag':>3} {'rollouts':>9}"
            )
            self.header_printed = True
        print(
            f"{state.global_step:>5} {logs.get('reward', float('nan')):>7.3f} {logs['bapo/x1']:>4.0f} "
            f"{logs['bapo/x2']:>4.0f} {logs['bapo/x3']:>4.0f} {self.batch_groups:>4} "
            f"{logs['bapo/difficult_buffer']:>6.0f} {logs['bapo/high_quality_buffer']:>6.0f} "
            f"{logs['bapo/c2']:>5.2f} {logs['bapo/c3']:>5.2f} {logs['bapo/policy_lag']:>3.0f} "
            f"{logs['bapo/rollouts']:>9.0f}",
            flush=True,
        )


class StepClock(TrainerCallback):
    """Wall seconds of each optimizer step, from the end of the one before (the first from its own beginning)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._last: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now
