"""Where a run stands inside a rollout step, so that a checkpoint written between two of its optimizer steps resumes
it where it stopped.

One rollout step trains `steps_per_generation * num_iterations` micro-steps; with more than one optimizer step in
them (`steps_per_generation` above `gradient_accumulation_steps`, or `num_iterations` above 1) a checkpoint can fall
inside it. TRL counts micro-steps in `_step`, which a new trainer starts at 0, and generates again whenever it holds no
micro-batches (trl 1.16.0, `GRPOTrainer._prepare_inputs`): resumed there, it would take the repeated dataloader batch
for a new rollout step, generate, score and store its prompts a second time, drop the rest of the assembled batch and
shift every later rollout step. So each process saves its micro-step count and, inside a rollout step, the
micro-batches it has not trained yet, with the optimizer steps of them BAPO skips; a resume puts them back.

Both depend on how a rollout step is cut, and transformers skips `global_step x gradient_accumulation_steps` batches of
the data on resume: a resume under another cut is refused where it would train other micro-batches or read the data
from another place than the run stopped at.
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import send_to_device

# How a rollout step is cut into micro-batches and optimizer steps: untrained micro-batches only fit the same cut.
SCHEDULE = ("gradient_accumulation_steps", "steps_per_generation", "num_iterations", "per_device_train_batch_size")


def micro_steps_per_rollout(args) -> int:
    """Micro-steps from one rollout step to the next (TRL's `generate_every`)."""
    return args.steps_per_generation * args.num_iterations


def schedule(trainer) -> dict[str, int]:
    return {**{name: getattr(trainer.args, name) for name in SCHEDULE}, "processes": trainer.accelerator.num_processes}


def progress_state(trainer) -> dict[str, Any]:
    """This process's place in the rollout step: the micro-step count and, between two of a rollout step's optimizer
    steps, its micro-batches (all of them, as num_iterations trains them again) and which optimizer steps are
    skipped; with the cut they were made for."""
    inside = trainer._step % micro_steps_per_rollout(trainer.args) != 0 and trainer._buffered_inputs is not None
    return {
        "micro_step": trainer._step,
        "global_step": trainer.state.global_step,
        "schedule": schedule(trainer),
        "chunks": list(trainer._buffered_inputs) if inside else None,
        "skipped_updates": list(trainer._skipped_updates) if inside else None,
    }


def restore_progress(trainer, saved: dict[str, Any] | None) -> None:
    """Puts a saved `progress_state` back. A checkpoint written before this was saved (None) resumes as TRL does,
    with a new rollout step."""
    if saved is None:
        return
    check_schedule(trainer, saved)
    if saved["chunks"] is not None:
        device = trainer.accelerator.device
        trainer._buffered_inputs = [send_to_device(chunk, device) for chunk in saved["chunks"]]
        trainer._skipped_updates = list(saved["skipped_updates"])
    trainer._step = saved["micro_step"]


def check_schedule(trainer, saved: dict[str, Any]) -> None:
    """Refuses a resume whose cut of a rollout step cannot go on from the saved one: inside a rollout step any change
    (the untrained micro-batches were cut for the old one, and live in the old processes' files); at its end, a
    change that makes transformers' data skip land elsewhere than after the rollout steps done."""
    now, then = schedule(trainer), saved["schedule"]
    changed = ", ".join(f"{name} {then[name]} then, {now[name]} now" for name in then if then[name] != now[name])
    advice = "Resume with the settings the checkpoint was written with"
    if saved["chunks"] is not None and changed:
        raise ValueError(
            f"Cannot resume inside a rollout step under another cut of it ({changed}): the checkpoint holds each "
            f"process's untrained micro-batches as they were cut then. {advice}, or from a checkpoint written at the "
            "end of a rollout step."
        )
    done = saved["micro_step"] // (then["steps_per_generation"] * then["num_iterations"])
    skipped = saved["global_step"] * trainer.args.gradient_accumulation_steps
    skips_data = not trainer.args.ignore_data_skip
    if saved["chunks"] is None and skips_data and skipped != done * micro_steps_per_rollout(trainer.args):
        raise ValueError(
            f"Cannot resume under another cut of a rollout step ({changed}): transformers skips global_step x "
            f"gradient_accumulation_steps = {skipped} batches of the data, which is not where the run stopped "
            f"(after {done} rollout steps of {micro_steps_per_rollout(trainer.args)} batches each), so prompts would "
            f"be scored twice or never. {advice}."
        )
