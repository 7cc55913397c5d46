"""The datasets `trl-bapo` trains on, in TRL's prompt format: the embedded synthetic tasks, a Hub or local dataset
(with a formatter for the paper's), or a TRL dataset mixture (`datasets:` in the YAML)."""

from __future__ import annotations

from collections.abc import Callable

from datasets import Dataset, IterableDataset, load_dataset
from trl import DatasetMixtureConfig, ScriptArguments, get_dataset

from trl_bapo.builtin.embedded import embedded_datasets
from trl_bapo.builtin.tasks import CHAT_TASKS, TASKS

EMBEDDED = "embedded"
EMBEDDED_DATASETS = {f"{EMBEDDED}-{task}": task for task in TASKS + CHAT_TASKS}
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
COUNTDOWN_INSTRUCTION = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use +, -, * and /, and each "
    'number at most once. Show your reasoning, then give only the expression, without "= {target}", in '
    "<answer> </answer> tags, for example <answer>(1 + 2) * 3</answer>."
)
Prompts = Dataset | IterableDataset


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
KNOWN = sorted(EMBEDDED_DATASETS) + sorted(FORMATTERS)


def _with_prompts(dataset: Prompts, source: str) -> Prompts:
    if dataset.column_names is not None and "prompt" not in dataset.column_names:
        raise ValueError(
            f"dataset {source} has no 'prompt' column and no formatter; supported datasets are {KNOWN}, any other "
            f"needs a 'prompt' column (it has {dataset.column_names})."
        )
    return dataset


def load_prompts(script_args: ScriptArguments, split: str) -> Prompts:
    """`split` of the dataset named by `dataset_name`, with the columns its reward functions read; streamed with
    `dataset_streaming`."""
    name, streaming = script_args.dataset_name, script_args.dataset_streaming
    if name is None:
        raise ValueError(f"dataset_name (or a `datasets:` mixture) is required; dataset_name can be one of {KNOWN}")
    if name in EMBEDDED_DATASETS:
        train, heldout = embedded_datasets(EMBEDDED_DATASETS[name])
        dataset = train if split == script_args.dataset_train_split else heldout
        return dataset.to_iterable_dataset() if streaming else dataset
    dataset = load_dataset(name, script_args.dataset_config, split=split, streaming=streaming)
    if name in FORMATTERS:
        return dataset.map(FORMATTERS[name])
    return _with_prompts(dataset, repr(name))


def load_mixture(mixture: DatasetMixtureConfig, split: str) -> Prompts:
    """`split` of a TRL dataset mixture, loaded by TRL's `get_dataset` as `trl grpo` loads it."""
    splits = get_dataset(mixture)
    if split not in splits:
        raise ValueError(
            f"the `datasets:` mixture has no {split!r} split, only {sorted(splits)}; set test_split_size to hold out "
            "a test split, or dataset_test_split to the split to evaluate on."
        )
    return _with_prompts(splits[split], "mixture")
