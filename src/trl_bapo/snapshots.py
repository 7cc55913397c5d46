"""What B_bad and B_high hold, as JSON lines a user can read: one line per stored prompt or group.

Each line gives the buffer ("difficult", "high_quality", or with `shared_buffer` "shared", then with the entry's
latest accuracy), the prompt as text (an image or any other non-text value as a placeholder; the row itself
is named by `key`, the prompt key of eq. 4, the same the buffers deduplicate by), its accuracy, the rollout step it
entered at and its age in rollout steps, and how often it was used since: re-evaluated (B_bad) or replayed into X3
(B_high). The trainer writes `bapo_buffers.jsonl` into every checkpoint, and with `log_buffer_snapshots` appends
the same lines, tagged with the global step, to `output_dir/bapo_buffers.jsonl` at every logging step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback

from trl_bapo.buffers import BufferedGroup, SharedBuffer
from trl_bapo.state import BAPOState

SNAPSHOT_FILE = "bapo_buffers.jsonl"
PLACEHOLDER = "<image>"


def plain_prompt(prompt: Any) -> Any:
    """`prompt` with only text, numbers and the structure of conversational messages; anything else (an image, an
    array) becomes a placeholder."""
    if isinstance(prompt, (str, int, float, bool, type(None))):
        return prompt
    if isinstance(prompt, dict):
        return {key: plain_prompt(value) for key, value in prompt.items()}
    if isinstance(prompt, (list, tuple)):
        return [plain_prompt(value) for value in prompt]
    return PLACEHOLDER


def buffer_lines(state: BAPOState) -> list[dict]:
    """One line per prompt of B_bad (oldest first), then one per group of B_high (oldest first); with the shared
    buffer, one line per entry (oldest first), with its latest accuracy."""
    buffers, rollout_step = state.buffers, state.rollout_step

    def line(buffer: str, group: BufferedGroup, use: str) -> dict:
        return {
            "buffer": buffer,
            "key": group.key,
            "prompt": plain_prompt(group.prompt),
            "accuracy": group.accuracy,
            "entered": group.step,
            "age": rollout_step - group.step,
            use: getattr(group, use),
        }

    if isinstance(buffers, SharedBuffer):
        return [
            {**line("shared", group, "reevaluated"), "replayed": group.replayed, "latest": buffers.latest(group)}
            for group in buffers.entries()
        ]
    return [line("difficult", group, "reevaluated") for group in buffers.difficult_entries()] + [
        line("high_quality", group, "replayed") for group in buffers.high_quality_entries()
    ]


def write_lines(path: str, lines: Iterable[dict], mode: str = "w", **tags: Any) -> None:
    with open(path, mode) as file:
        for line in lines:
            file.write(json.dumps({**tags, **line}) + "\n")


class BufferSnapshots(TrainerCallback):
    """Appends the buffers' lines to `output_dir/bapo_buffers.jsonl` at every logging step (the main process writes;
    the buffers are the same on every process)."""

    def __init__(self, state: BAPOState, accelerator):
        self.state, self.accelerator = state, accelerator

    def path(self, args) -> str:
        return os.path.join(args.output_dir, SNAPSHOT_FILE)

    def on_train_begin(self, args, state, control, **kwargs):
        # Resumed: the lines written after the checkpoint was saved belong to steps that will run again.
        if self.accelerator.is_main_process and os.path.exists(self.path(args)):
            with open(self.path(args)) as file:
                kept = [line for line in file if json.loads(line)["step"] <= state.global_step]
            with open(self.path(args), "w") as file:
                file.writelines(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        training_log = logs and "train_runtime" not in logs and not any(key.startswith("eval_") for key in logs)
        if self.accelerator.is_main_process and training_log:
            os.makedirs(args.output_dir, exist_ok=True)
            write_lines(self.path(args), buffer_lines(self.state), "a", step=state.global_step)
