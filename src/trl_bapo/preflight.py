"""What BAPOTrainer checks before TRL loads anything: inputs a run would otherwise fail on late, after the model and
the engine loaded (a dataset without prompts) or after the whole run (an output directory it cannot write); and, once
TRL has built the trainer, the engines and datasets BAPO cannot run with."""

from __future__ import annotations

import inspect
import os
import tempfile
from typing import Any

from trl import GRPOConfig, GRPOTrainer

from trl_bapo.sampling import model_sampling


def constructor_arguments(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """GRPOTrainer's constructor arguments by name, however they were passed (trl 1.16.0's signature)."""
    return inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs).arguments


def check_datasets(train_dataset: Any, eval_dataset: Any, prompt_optional: bool) -> None:
    """Every row needs a `prompt`, as TRL reads it, unless an `environment_factory` makes it optional; an iterable
    dataset that does not know its columns is left to TRL. An empty train dataset would train 0 steps and exit 0."""
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, dict):
        named += [(f"eval_dataset[{key!r}]", value) for key, value in eval_dataset.items()]
    else:
        named.append(("eval_dataset", eval_dataset))
    for name, dataset in named:
        if dataset is None:
            continue
        columns = getattr(dataset, "column_names", None)
        if columns is not None and "prompt" not in columns and not prompt_optional:
            raise ValueError(
                f"{name} has no 'prompt' column (its columns: {columns}); each row's prompt is read from it. Rename "
                "the column that holds the prompts (dataset.rename_column(old, 'prompt')), or pass an "
                "environment_factory, which makes the prompt optional."
            )
        if name == "train_dataset" and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(
                "train_dataset is empty: training would take 0 steps and exit as if it had succeeded. Pass a dataset "
                "with rows."
            )


def check_output_dir(output_dir: str) -> None:
    """The output directory takes files now, not only when the first checkpoint or the final model is saved."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".bapo-write-check-"):
            pass
    except OSError as error:
        raise ValueError(
            f"output_dir {output_dir!r} is not writable ({type(error).__name__}: {error.strerror or error}): "
            "checkpoints and the final model would fail to save after training. Choose a writable output_dir."
        ) from error


def check_trainer(trainer) -> None:
    """What only the built trainer shows: its engine and its datasets."""
    args = trainer.args
    if trainer._dist.fsdp_version == 1 and args.rollout_delay > 1:
        raise NotImplementedError(
            "The delayed rollout policy swaps each process's parameter shards, which FSDP1's flattened "
            "parameters do not expose. Use FSDP2 (fsdp_version: 2 in the accelerate config) or rollout_delay=1."
        )
    check_rollout_batch_fits(trainer.train_dataset, args, trainer.accelerator.num_processes)
    from_model = model_sampling(trainer)
    if from_model and (args.rollout_delay > 1 or args.use_high_quality_replay):
        settings = ", ".join(f"{key}={value!r}" for key, value in from_model.items())
        raise ValueError(
            f"The model's generation_config sets {settings}, which transformers' generate applies to every rollout "
            "where TRL leaves the setting unset: generation samples from a truncated or penalised distribution, but "
            "the behavior log-probs BAPO's importance ratio divides by (eq. 3) are the temperature-scaled softmax, so "
            "every delayed or replayed sample would be weighted wrongly. Clear them before training "
            "(model.generation_config.<name> = None, or remove them from generation_config.json), or train on fresh "
            "samples of the current policy only (rollout_delay=1, use_high_quality_replay=False)."
        )
    if args.dynamic_sampling and not hasattr(trainer.train_dataset, "__getitem__"):
        raise ValueError(
            "dynamic_sampling draws extra prompts by index and needs a map-style train dataset; pass a "
            "datasets.Dataset rather than an IterableDataset, or set dynamic_sampling=False."
        )


def check_rollout_batch_fits(train_dataset: Any, args: GRPOConfig, processes: int) -> None:
    """TRL's train sampler (trl 1.16.0, `RepeatSampler`) hands out the prompts of one rollout step together and drops
    a last batch with fewer: a dataset with fewer rows than one rollout step's prompts (generation_batch_size, the
    rollout batch of every process together, over num_generations) gives the dataloader no batch, and training
    takes 0 steps and exits as if it had succeeded. From that many rows on, each epoch has at least one rollout step.
    An iterable dataset does not know its rows and is left alone."""
    if not hasattr(train_dataset, "__len__"):
        return
    rows, prompts = len(train_dataset), args.generation_batch_size // args.num_generations
    if rows >= prompts:
        return
    raise ValueError(
        f"train_dataset has {rows} rows, fewer than the {prompts} prompts of one rollout batch: TRL's sampler drops "
        "an incomplete rollout batch, so training would take 0 steps and exit as if it had succeeded. A rollout batch "
        f"holds generation_batch_size / num_generations = {args.generation_batch_size} / {args.num_generations} "
        f"prompts, with generation_batch_size = per_device_train_batch_size ({args.per_device_train_batch_size}) x "
        f"processes ({processes}) x steps_per_generation ({args.steps_per_generation}). Lower one of those (or set "
        f"generation_batch_size directly), raise num_generations, or pass a dataset with at least {prompts} rows."
    )
