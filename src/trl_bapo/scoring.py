"""TRL's generation and scoring as BAPO reads it: which completions are correct, and which groups carry a signal.

Whether a group has a learning signal is TRL's call (its advantages, under any reward aggregation and on any reward
scale); whether a completion is correct is BAPO's (`Correctness`): the reward `correctness_reward` names, a reward
that is 0/1, or a weighted sum in [0, 1].
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

from trl_bapo.kl import reference_kl_off
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


def finite_rewards(rewards_per_func: torch.Tensor, names: list[str], policy: str) -> tuple[torch.Tensor, int]:
    """A reward function's inf or -inf, by `non_finite_rewards`: an error naming the function and its values, or
    ('none') a missing reward, NaN, as TRL marks a None; with the count replaced. NaN already means None to TRL."""
    infinite = torch.isinf(rewards_per_func)
    count = int(infinite.sum())
    if count == 0:
        return rewards_per_func, 0
    if policy == "error":
        found = "; ".join(
            f"`{names[c]}` returned {sorted(set(rewards_per_func[infinite[:, c], c].tolist()))} for "
            f"{int(infinite[:, c].sum())} of {len(rewards_per_func)} completions"
            for c in infinite.any(dim=0).nonzero().flatten().tolist()
        )
        raise ValueError(
            f"Non-finite rewards: {found}. They would make every advantage of their group, r_tot and the thresholds "
            "c2, c3 meaningless. Return a finite value, or None for a completion the function cannot score; or set "
            "non_finite_rewards='none' to read them as None (counted in bapo/non_finite_rewards)."
        )
    return rewards_per_func.masked_fill(infinite, math.nan), count


STATED, FOUND, WEIGHTED_SUM, NONE = "stated", "found", "weighted_sum", "none"


class Correctness:
    """Which completions are correct (1 or 0; NaN where no reward function scored one), from TRL's gathered rewards
    per function. X1 needs no correctness (it keeps groups with a learning signal, on any reward scale); B_bad, B_high,
    X2 and X3 do, and which reward gives it is decided at the first scoring and kept for the run:

    1. stated: `correctness_reward` names the reward; a completion is correct when it reaches
       `correctness_threshold`;
    2. found: a reward function whose values are all 0 or 1 (TRL's `accuracy_reward`, a math-verify reward) is the
       signal, even beside other rewards; among several, the one with the largest weight, the first on a tie;
    3. the weighted sum of the rewards, when it lies in [0, 1] (a graded accuracy);
    4. none: no reward is on the scale c1, c2, c3 are made for, so the difficulty buffers stay empty and BAPO trains
       on the online filter alone (one warning says how to turn them on).

    Once decided, a reward that leaves its scale (a 0/1 reward that returns 0.5, a sum that leaves [0, 1]) stops
    the run with an error that says how to state the signal: the thresholds must not silently change meaning."""

    def __init__(self, reward_name: str | None, threshold: float, trainer):
        self.names, self.weights = list(trainer.reward_func_names), trainer.reward_weights.detach().cpu()
        self.threshold, self.is_main = threshold, trainer.accelerator.is_main_process
        self.column = None if reward_name is None else self.names.index(reward_name)
        self.source = STATED if reward_name is not None else None
        if self.source == STATED and self.is_main:
            logger.info("BAPO's correctness: %s.", self.description)

    @property
    def description(self) -> str:
        """Which reward defines correctness, in words (`bapo_status.correctness`)."""
        if self.source == STATED:
            return f"reward `{self.names[self.column]}` >= {self.threshold:g} (correctness_reward)"
        if self.source == FOUND:
            return f"reward `{self.names[self.column]}` (its values are 0/1)"
        if self.source == WEIGHTED_SUM:
            return "the weighted sum of rewards, in [0, 1], read as an accuracy"
        if self.source == NONE:
            return "none (no 0/1 reward and the weighted sum leaves [0, 1]): difficulty buffers off"
        return "decided at the first scoring"

    def __call__(self, per_func: torch.Tensor) -> torch.Tensor:
        per_func = per_func.detach().float().cpu()
        if self.source is None:
            self._decide(per_func)
        if self.source == STATED:
            return correct_completions(per_func[:, self.column], self.threshold)
        if self.source == FOUND:
            values = per_func[:, self.column]
            self._check_scale(values, is_zero_one(values), "0 or 1")
            return values
        if self.source == WEIGHTED_SUM:
            total = self._weighted_sum(per_func)
            self._check_scale(total, is_unit_interval(total), "in [0, 1]")
            return total
        return torch.full((len(per_func),), math.nan)

    def _weighted_sum(self, per_func: torch.Tensor) -> torch.Tensor:
        total = (per_func * self.weights.unsqueeze(0)).nansum(dim=1)
        total[torch.isnan(per_func).all(dim=1)] = math.nan
        return total

    def _decide(self, per_func: torch.Tensor) -> None:
        zero_one = [c for c in range(per_func.shape[1]) if is_zero_one(per_func[:, c])]
        if zero_one:
            self.column = max(zero_one, key=lambda c: (float(self.weights[c]), -c))
            self.source = FOUND
        elif is_unit_interval(self._weighted_sum(per_func)):
            self.source = WEIGHTED_SUM
        else:
            self.source = NONE
        if not self.is_main:
            return
        if self.source == NONE:
            total = self._weighted_sum(per_func).nan_to_num(nan=0.0)
            logger.warning(
                "BAPO found no correctness signal: no reward function returns only 0/1 and the weighted sum of "
                "rewards leaves [0, 1] (here [%.3g, %.3g]). B_bad and B_high (X2, X3) stay off and BAPO trains on "
                "the online filter alone (groups with a learning signal). To turn them on, set correctness_reward "
                "to the reward function that says whether a completion is right, and correctness_threshold to the "
                "value that counts as right.",
                float(total.min()),
                float(total.max()),
            )
        elif len(self.names) > 1 or self.source == WEIGHTED_SUM:
            logger.warning("BAPO's correctness: %s. Set correctness_reward to choose another.", self.description)
        else:
            logger.info("BAPO's correctness: %s.", self.description)

    def _check_scale(self, values: torch.Tensor, on_scale: bool, scale: str) -> None:
        if on_scale:
            return
        finite = values[~torch.isnan(values)]
        raise ValueError(
            f"BAPO's correctness is {self.description}, decided at the first scoring, but it now returns values "
            f"outside {scale} (from {float(finite.min()):.3g} to {float(finite.max()):.3g}). The thresholds c1, c2, "
            "c3 would silently change meaning. State the correctness signal: set correctness_reward to the reward "
            "function that says whether a completion is right and correctness_threshold to the value that counts as "
            "right (for example 1.0, or 0.5 for partial credit)."
        )


def is_zero_one(values: torch.Tensor) -> bool:
    """Every scored value (NaN: not scored) is 0 or 1, and at least one was scored."""
    scored = values[~torch.isnan(values)]
    return len(scored) > 0 and bool(((scored == 0) | (scored == 1)).all())


def is_unit_interval(values: torch.Tensor) -> bool:
    scored = values[~torch.isnan(values)]
    return len(scored) > 0 and bool(((scored >= 0) & (scored <= 1)).all())


def score(trainer, inputs: list[dict[str, Any]]) -> ScoredRollout:
    """TRL's generation and scoring of this process's rows, with every process's advantages and correctness, and
    the seconds TRL took."""
    started = time.perf_counter()
    with reference_kl_off(trainer):
        # Copies: TRL writes a rollout_func's extra fields into the rows it scores (trl 1.16.0), and a group's G rows
        # may be one dict (re-evaluation); the dataset rows stay as they were, for the buffers and their prompt keys.
        batch = trainer._generate_and_score_completions([dict(example) for example in inputs])
    seconds = time.perf_counter() - started
    # Image fields become one entry per row (TRL's own split), so rows can be selected, stored and replayed.
    batch = split_pixel_values_by_grid(batch)
    accelerator = trainer.accelerator
    advantages = batch["advantages"] if accelerator.num_processes == 1 else accelerator.gather(batch["advantages"])
    correct = trainer._correctness(trainer._last_rewards_per_func)
    examples = inputs if accelerator.num_processes == 1 else gather_object(inputs)
    return ScoredRollout(batch, advantages.cpu(), correct, examples, seconds)


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
