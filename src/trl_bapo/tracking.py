"""Prompt tracking (`track_prompts`): which evaluation prompts the policy unlocked, kept, or lost.

Before training, every prompt of the evaluation dataset is measured: its accuracy over G samples of the policy. At
each evaluation it is measured again, and one JSON record per measurement goes to `output_dir/prompt_tracking.jsonl`:
each prompt's accuracy, how many prompts sit at 0/G .. G/G (the paper's fig. 7), how many moved between those bins
since the baseline (fig. 15), how many were unlocked (0/G at the baseline, solved at least once now) and relocked
(solved at the baseline, 0/G now), and the most improved prompts. Every measurement makes the same draw, under
either `rollout_sampling_seed` (`EngineCalls.same_draw`: the global generator seeded alike, or the same per-call
seeds whatever the step), so two records differ by the weights, not by the draw.

Measuring goes through TRL's generation and scoring, so it works wherever training does (vLLM, several processes,
sharded engines); every process takes part and gets the same numbers, and process 0 writes. On resume the file is
continued: records written after the checkpoint was saved are dropped, and the baseline stays the first run's.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback

TRACKING_FILE = "prompt_tracking.jsonl"
MOST_IMPROVED = 10  # prompts listed in each record, by accuracy gained over the baseline


def accuracy_bins(accuracies: Sequence[float], samples: int) -> list[int]:
    """How many prompts sit at 0/G, 1/G, ..., G/G."""
    counts = [0] * (samples + 1)
    for accuracy in accuracies:
        counts[round(accuracy * samples)] += 1
    return counts


def migration_counts(baseline: Sequence[float], now: Sequence[float], samples: int) -> list[list[int]]:
    """counts[i][j]: prompts that moved from bin i/G at the baseline to bin j/G now."""
    counts = [[0] * (samples + 1) for _ in range(samples + 1)]
    for before, after in zip(baseline, now, strict=True):
        counts[round(before * samples)][round(after * samples)] += 1
    return counts


def tracking_record(
    step: int, accuracies: Sequence[float], baseline: Sequence[float] | None, samples: int, prompts: Sequence[Any]
) -> dict[str, Any]:
    """One line of the tracking file: the measurement at global step `step`, against `baseline` (None: this is it)."""
    record = {
        "step": step,
        "baseline": baseline is None,
        "samples": samples,
        "mean_accuracy": statistics.fmean(accuracies),
        "accuracy": list(accuracies),
        "bins": accuracy_bins(accuracies, samples),
    }
    if baseline is None:
        return record
    pairs = list(zip(baseline, accuracies, strict=True))
    gained = sorted(range(len(pairs)), key=lambda i: pairs[i][1] - pairs[i][0], reverse=True)
    record |= {
        "unsolved_at_baseline": sum(before == 0 for before, _ in pairs),
        "unlocked": sum(before == 0 and after > 0 for before, after in pairs),
        "solved_at_baseline": sum(before > 0 for before, _ in pairs),
        "relocked": sum(before > 0 and after == 0 for before, after in pairs),
        "improved": sum(after > before for before, after in pairs),
        "degraded": sum(after < before for before, after in pairs),
        "migration": migration_counts(baseline, accuracies, samples),
        "most_improved": [
            {"index": i, "prompt": prompts[i], "baseline": pairs[i][0], "accuracy": pairs[i][1]}
            for i in gained[:MOST_IMPROVED]
            if pairs[i][1] > pairs[i][0]
        ],
    }
    return record


def read_records(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def write_records(path: str, records: Sequence[dict[str, Any]], mode: str = "w") -> None:
    with open(path, mode) as file:
        for record in records:
            file.write(json.dumps(record) + "\n")


class PromptTracking(TrainerCallback):
    """Measures the evaluation prompts before training and after every evaluation. `measure(prompts)` returns each
    prompt's accuracy under the current weights, the same on every process (`trl_bapo.scoring.sampled_accuracies`,
    through the trainer, which first sends a vLLM engine the current weights)."""

    def __init__(self, trainer, measure):
        if isinstance(trainer.eval_dataset, dict):  # without one, transformers has refused eval_strategy already
            raise ValueError(
                "track_prompts=True measures the prompts of one eval_dataset; pass a single eval_dataset to the "
                "trainer (not a dict of several), or set track_prompts=False."
            )
        self.trainer, self.measure = trainer, measure
        self.baseline: list[float] | None = None
        self.records: list[dict[str, Any]] = []  # the file's records of this run (resumed: from the baseline on)

    @property
    def path(self) -> str:
        return os.path.join(self.trainer.args.output_dir, TRACKING_FILE)

    def _examples(self) -> list[dict[str, Any]]:
        dataset = self.trainer.eval_dataset
        return [dict(dataset[i]) for i in range(len(dataset))]

    def _measure(self, step: int) -> dict[str, Any]:
        examples = self._examples()
        # The same draw at every measurement, without moving what training samples from.
        with self.trainer._engine_calls.same_draw("tracking"):
            accuracies = self.measure(examples)
        prompts = [example["prompt"] for example in examples]
        return tracking_record(step, accuracies, self.baseline, self.trainer.num_generations, prompts)

    def on_train_begin(self, args, state, control, **kwargs):
        # Resumed: continue the file up to the checkpoint's step, from the first run's baseline.
        kept = [record for record in read_records(self.path) if record["step"] <= state.global_step]
        # Process 0's file decides for all of them (other nodes may not see it), before anyone rewrites it.
        kept = broadcast_object_list([kept if self.trainer.is_world_process_zero() else None])[0]
        baselines = [record for record in kept if record["baseline"]]
        if state.global_step > 0 and baselines:
            self.baseline, self.records = baselines[0]["accuracy"], kept
            if self.trainer.is_world_process_zero():
                write_records(self.path, kept)
            return
        record = self._measure(state.global_step)
        self.baseline, self.records = record["accuracy"], [record]
        if self.trainer.is_world_process_zero():
            os.makedirs(args.output_dir, exist_ok=True)
            write_records(self.path, [record])

    def on_evaluate(self, args, state, control, **kwargs):
        if self.baseline is None:  # `evaluate()` called before any training: nothing to measure against
            return
        record = self._measure(state.global_step)
        self.records.append(record)
        if self.trainer.is_world_process_zero():
            write_records(self.path, [record], mode="a")
