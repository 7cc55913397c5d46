"""TRL's generation and scoring as BAPO reads it: which completions are correct, and which groups carry a signal.

Whether a group has a learning signal is TRL's call (its advantages, under any reward aggregation); whether a
completion is correct is BAPO's: its weighted reward, or the reward `correctness_reward` names.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers.utils import logging
from trl.trainer.utils import get_callable_name, get_config_model_id, split_pixel_values_by_grid

from trl_bapo.records import ScoredRollout
from trl_bapo.selection import correct_completions, group_accuracy

logger = logging.get_logger(__name__)


def reward_names(reward_funcs) -> list[str]:
    """The names TRL gives `reward_funcs` (trl 1.16.0, GRPOTrainer.__init__), before any reward model is loaded: a
    model's id (the last part of its path), or the function's name."""
    funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs] if reward_funcs is not None else []
    return [
        func.rstrip("/").split("/")[-1]
        if isinstance(func, str)
        else get_config_model_id(func.config).split("/")[-1]
        if isinstance(func, torch.nn.Module)
        else get_callable_name(func)
        for func in funcs
    ]


def check_correctness_reward(correctness_reward: str | None, reward_funcs) -> None:
    """Before TRL loads the model, the reward models and the engine: `correctness_reward` names a reward function."""
    names = reward_names(reward_funcs)
    if correctness_reward is not None and correctness_reward not in names:
        raise ValueError(
            f"correctness_reward={correctness_reward!r} names none of this trainer's reward functions {names}; set it "
            "to one of them (as in TRL's `rewards/<name>/mean` log)."
        )


class Correctness:
    """Which completions are correct, from TRL's gathered rewards per function: the reward `correctness_reward`
    names reaching `correctness_threshold`, or without one the weighted sum of rewards, read as an accuracy (a
    warning, once, when rewards leave [0, 1]). NaN: no reward function scored the completion."""

    def __init__(self, reward_name: str | None, threshold: float, trainer):
        self.column = None if reward_name is None else trainer.reward_func_names.index(reward_name)
        self.threshold, self.weights, self.warned = threshold, trainer.reward_weights, False

    def __call__(self, per_func: torch.Tensor) -> torch.Tensor:
        if self.column is not None:
            return correct_completions(per_func[:, self.column].cpu(), self.threshold)
        correct = (per_func * self.weights.to(per_func.device).unsqueeze(0)).nansum(dim=1).cpu()
        correct[torch.isnan(per_func).all(dim=1).cpu()] = math.nan
        self._warn_if_not_accuracy(correct)
        return correct

    def _warn_if_not_accuracy(self, rewards: torch.Tensor) -> None:
        finite = rewards[~torch.isnan(rewards)]
        if self.warned or not ((finite < 0) | (finite > 1)).any():
            return
        self.warned = True
        logger.warning(
            "Rewards range over [%.3g, %.3g], but BAPO reads their mean per group as accuracy: the thresholds c1, c2, "
            "c3 and the range filter assume rewards in [0, 1]. Set correctness_reward (and correctness_threshold) "
            "to the reward that says whether a completion is right.",
            float(finite.min()),
            float(finite.max()),
        )


def score(trainer, inputs: list[dict[str, Any]]) -> ScoredRollout:
    """TRL's generation and scoring of this process's rows, with every process's advantages and correctness, and
    the seconds TRL took."""
    started = time.perf_counter()
    with reference_kl_off(trainer):
        batch = trainer._generate_and_score_completions(inputs)
    seconds = time.perf_counter() - started
    # Image fields become one entry per row (TRL's own split), so rows can be selected, stored and replayed.
    batch = split_pixel_values_by_grid(batch)
    accelerator = trainer.accelerator
    advantages = batch["advantages"] if accelerator.num_processes == 1 else accelerator.gather(batch["advantages"])
    correct = trainer._correctness(trainer._last_rewards_per_func)
    examples = inputs if accelerator.num_processes == 1 else gather_object(inputs)
    return ScoredRollout(batch, advantages.cpu(), correct, examples, seconds)


@contextmanager
def reference_kl_off(trainer) -> Iterator[None]:
    """With the behavior-policy KL there is no reference model; TRL would try to score one while beta != 0."""
    beta = trainer.beta
    if trainer._behavior_kl:
        trainer.beta = 0.0
    try:
        yield
    finally:
        trainer.beta = beta


@contextmanager
def muted_metrics(trainer) -> Iterator[None]:
    """Re-evaluation goes through TRL's scoring, which would log its rewards as the training reward and its
    completions in the completions table (`log_completions`) as if they were the training rollout."""
    metrics, logs = trainer._metrics["train"], trainer._logs
    trainer._metrics["train"], trainer._logs = defaultdict(list), copy.deepcopy(logs)
    try:
        yield
    finally:
        trainer._metrics["train"], trainer._logs = metrics, logs


def score_prompts(trainer, examples: list[dict[str, Any]]) -> tuple[ScoredRollout, torch.Tensor]:
    """G completions of each of `examples` under the weights in the model, through TRL's generation and scoring, and
    per example the index of its first scored group. The prompts are shared between processes with accelerate's
    split, padded by repeating the last prompt, because TRL gathers rewards across processes and expects every
    process to score as many rows; a prompt scored twice counts once."""
    group_size, accelerator = trainer.num_generations, trainer.accelerator
    with accelerator.split_between_processes(list(range(len(examples))), apply_padding=True) as share:
        with muted_metrics(trainer):
            scored = score(trainer, [examples[i] for i in share for _ in range(group_size)])
        order = share if accelerator.num_processes == 1 else gather_object(share)
    return scored, torch.tensor([order.index(i) for i in range(len(examples))])


def sampled_accuracies(trainer, examples: list[dict[str, Any]], batch: int) -> list[float]:
    """Each prompt's accuracy over G samples of the current policy, the same on every process: prompt tracking's
    measurement. It samples as training does (TRL's generation in training mode, `batch` prompts at a time), and
    leaves no trace in training's metrics or token count."""
    model, tokens = trainer.model, trainer.state.num_input_tokens_seen
    was_training = model.training
    model.train()
    try:
        accuracies = []
        for start in range(0, len(examples), batch):
            scored, first = score_prompts(trainer, examples[start : start + batch])
            accuracies += group_accuracy(scored.correct, trainer.num_generations)[first].tolist()
    finally:
        model.train(was_training)
        trainer.state.num_input_tokens_seen = tokens
    return accuracies
