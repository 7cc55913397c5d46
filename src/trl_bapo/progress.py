"""Where a run stands inside a rollout step, so that a checkpoint written between two of its optimizer steps resumes
it where it stopped.

One rollout step trains `steps_per_generation * num_iterations` micro-steps; with more than one optimizer step in
them (`steps_per_generation` above `gradient_accumulation_steps`, or `num_iterations` above 1) a checkpoint can fall
inside it. TRL counts micro-steps in `_step`, which a new trainer starts at 0, and generates again whenever it holds no
micro-batches (trl 1.16.0, `GRPOTrainer._prepare_inputs`): resumed there, it would take the repeated dataloader batch
for a new rollout step, generate, score and store its prompts a second time, drop the rest of the assembled batch and
shift every later rollout step. So each process saves its micro-step count and, inside a rollout step, the
micro-batches it has not trained yet, with the optimizer steps of them BAPO skips; a resume puts them back.
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import send_to_device


def micro_steps_per_rollout(args) -> int:
    """Micro-steps from one rollout step to the next (TRL's `generate_every`)."""
    return args.steps_per_generation * args.num_iterations


def progress_state(trainer) -> dict[str, Any]:
    """This process's place in the rollout step: the micro-step count and, between two of a rollout step's optimizer
    steps, its micro-batches (all of them, as num_iterations trains them again) and which optimizer steps are
    skipped."""
    inside = trainer._step % micro_steps_per_rollout(trainer.args) != 0 and trainer._buffered_inputs is not None
    return {
        "micro_step": trainer._step,
        "micro_steps_per_rollout": micro_steps_per_rollout(trainer.args),
        "chunks": list(trainer._buffered_inputs) if inside else None,
        "skipped_updates": list(trainer._skipped_updates) if inside else None,
    }


def restore_progress(trainer, saved: dict[str, Any] | None) -> None:
    """Puts a saved `progress_state` back. A checkpoint written before this was saved (None) resumes as TRL does,
    with a new rollout step."""
    if saved is None:
        return
    if saved["chunks"] is not None:
        now = micro_steps_per_rollout(trainer.args)
        if saved["micro_steps_per_rollout"] != now:
            raise ValueError(
                f"Cannot resume inside a rollout step: the checkpoint was written inside one of "
                f"{saved['micro_steps_per_rollout']} micro-steps "
                f"(steps_per_generation x num_iterations), and this run has {now}: its untrained micro-batches do not "
                "fit. Resume with the settings it was written with, or from a checkpoint at the end of a rollout step."
            )
        device = trainer.accelerator.device
        trainer._buffered_inputs = [send_to_device(chunk, device) for chunk in saved["chunks"]]
        trainer._skipped_updates = list(saved["skipped_updates"])
    trainer._step = saved["micro_step"]
