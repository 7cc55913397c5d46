"""TRL's generation and scoring as BAPO reads it: which completions are correct, and which groups carry a signal.

Whether a group has a learning signal is TRL's call (its advantages, under any reward aggregation and on any reward
scale); whether a completion is correct is BAPO's (`Correctness`): the reward `correctness_reward` names, TRL's
accuracy reward known by name, or the only reward function when its values lie in [0, 1]; among several, none.
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


# TRL's own reward functions (trl 1.16.0, `trl.rewards`), by the name TRL logs them under (`reward_func_names`), and
# what each says. Matched by name rather than by identity: TRL's scripts and docs name a user's own verifier
# `accuracy_reward` too, and a function by that name that leaves [0, 1] stops the run with the fix.
TRL_CORRECTNESS = {
    "accuracy_reward": "TRL's accuracy reward",
    "reasoning_accuracy_reward": "TRL's reasoning-accuracy reward",
}
TRL_NEVER_CORRECTNESS = {
    "think_format_reward": "TRL's format reward",
    "soft_overlong_punishment_reward": "TRL's overlong penalty",
    "repetition_penalty_reward": "TRL's repetition penalty",
    # Correctness and length in one value, on bounds the user chose: no threshold of ours reads correctness from it
    # (stated, with correctness_threshold=0 and its default bounds, it does).
    "cosine_scaled_reward": "TRL's length-scaled accuracy",
}

# How correctness was decided; None while the only candidate's first scores are still to come.
SOURCES = STATED, KNOWN, ONLY, SEVERAL, OFF_SCALE, NO_CANDIDATE = (
    "stated",
    "known",
    "only",
    "several",
    "off_scale",
    "no_candidate",
)


def decide_by_names(names: list[str], stated: str | None) -> tuple[str | None, int | None]:
    """Which reward says a completion is right, from the reward functions' names alone: (source, column), where
    source None means that `column` is the only candidate and its first scored values decide. Values never choose
    among several rewards: on the first batch a format bonus, a length penalty or a partial credit can all look like
    a 0/1 accuracy."""
    if stated is not None:
        return STATED, names.index(stated)
    known = [column for column, name in enumerate(names) if name in TRL_CORRECTNESS]
    if len(known) == 1:
        return KNOWN, known[0]
    candidates = [column for column, name in enumerate(names) if name not in TRL_NEVER_CORRECTNESS]
    if len(candidates) == 1:
        return None, candidates[0]
    return (SEVERAL if candidates else NO_CANDIDATE), None


def shaping(name: str) -> str:
    """A reward function that never says correctness, named and said what it is."""
    return f"`{name}` ({TRL_NEVER_CORRECTNESS[name]})"


class Correctness:
    """Which completions are correct (1 or 0; NaN where no reward function scored one, or none says it), from TRL's
    gathered rewards per function. X1 needs no correctness (it keeps groups with a learning signal, on any reward
    scale); B_bad, B_high, X2, X3 and r_tot do. The rule (docs/method.md, 'Which completions are correct'):

    1. stated: `correctness_reward` names the reward, read on any scale;
    2. known: exactly one reward function is TRL's accuracy or reasoning-accuracy reward (by name);
    3. only: one reward function is left once TRL's format, length, repetition and length-scaled rewards, which
       never say it, are set aside; its first scored values decide: in [0, 1] it is the signal, else none;
    4. none: several candidates and none stated, or none at all. The difficulty buffers stay empty and BAPO trains
       on the online filter alone, said once in a warning that names the rewards and `correctness_reward`.

    A completion is correct when the deciding reward is >= `correctness_threshold`. A known or only reward that
    leaves [0, 1] stops the run with an error that says how to state it: its threshold must not silently change
    meaning. The decision goes into the checkpoint (`state_dict`) and comes back on resume (`load_state_dict`)."""

    def __init__(self, reward_name: str | None, threshold: float, trainer):
        self.names = list(trainer.reward_func_names)
        self.threshold, self.is_main = threshold, trainer.accelerator.is_main_process
        self.source, self.column = decide_by_names(self.names, reward_name)
        if self.source is not None:  # the only candidate is said once its first scores have decided
            self._say()

    @property
    def description(self) -> str:
        """What decides a correct completion and why, in words (`bapo_status.correctness`)."""
        name = None if self.column is None else f"`{self.names[self.column]}`"
        reached = f">= {self.threshold:g}"
        if self.source == STATED:
            return f"reward {name} {reached} (correctness_reward)"
        if self.source == KNOWN:
            return f"reward {name} {reached} ({TRL_CORRECTNESS[self.names[self.column]]}, known by name)"
        if self.source == ONLY:
            return f"reward {name} {reached} ({self._only()}; its first scores were in [0, 1])"
        if self.source is None:
            return f"reward {name} {reached} if its first scores lie in [0, 1], else none ({self._only()})"
        off = "none ({}): difficulty buffers off"
        if self.source == OFF_SCALE:
            return off.format(f"{name}, {self._only()}, scored outside [0, 1] at first")
        listed = ", ".join(f"`{name}`" for name in self.names)
        if self.source == SEVERAL:
            return off.format(f"several reward functions, {listed}, and no correctness_reward")
        shapers = ", ".join(shaping(name) for name in self.names)
        return off.format(f"{shapers}: none says whether a completion is right")

    def _only(self) -> str:
        others = [shaping(name) for column, name in enumerate(self.names) if column != self.column]
        return f"the only reward function besides {', '.join(others)}" if others else "the only reward function"

    def __call__(self, per_func: torch.Tensor) -> torch.Tensor:
        per_func = per_func.detach().float().cpu()
        if self.source is None:
            self._decide_only(per_func[:, self.column])
        if self.source == STATED:
            return correct_completions(per_func[:, self.column], self.threshold)
        if self.source in (KNOWN, ONLY):
            values = per_func[:, self.column]
            self._check_scale(values)
            return correct_completions(values, self.threshold)
        return torch.full((len(per_func),), math.nan)

    def _decide_only(self, values: torch.Tensor) -> None:
        """The only candidate's first scored values decide; a batch it scored nothing of (all None) waits."""
        scored = values[~torch.isnan(values)]
        if len(scored) == 0:
            return
        self.source = ONLY if bool(((scored >= 0) & (scored <= 1)).all()) else OFF_SCALE
        self._say(f" (its first scores: from {float(scored.min()):.3g} to {float(scored.max()):.3g})")

    def _say(self, detail: str = "") -> None:
        """The decision, once, in the first log lines: a warning when it switches the difficulty buffers off."""
        if not self.is_main:
            return
        if self.source in (STATED, KNOWN, ONLY):
            logger.info("BAPO's correctness: %s.", self.description)
            return
        logger.warning(
            "BAPO's correctness: %s%s. B_bad and B_high (X2, X3) stay empty and BAPO trains on the online filter "
            "alone (groups with a learning signal). To turn them on, set correctness_reward to the reward function "
            "that says whether a completion is right, and correctness_threshold to the value that counts as right.",
            self.description,
            detail,
        )

    def _check_scale(self, values: torch.Tensor) -> None:
        scored = values[~torch.isnan(values)]
        if bool(((scored >= 0) & (scored <= 1)).all()):
            return
        raise ValueError(
            f"BAPO's correctness is {self.description}, but `{self.names[self.column]}` now returns values outside "
            f"[0, 1] (from {float(scored.min()):.3g} to {float(scored.max()):.3g}): its threshold, and with it c1, "
            "c2, c3 and r_tot, would silently change meaning. State the correctness signal: set correctness_reward "
            "to the reward function that says whether a completion is right and correctness_threshold to the value "
            "that counts as right (a stated reward is read on any scale)."
        )

    def state_dict(self) -> dict:
        """The decision, in plain values, for the checkpoint."""
        return {"names": list(self.names), "source": self.source, "column": self.column}

    def load_state_dict(self, saved: dict | None) -> None:
        """Restores a checkpoint's decision, so that a resumed run reads correctness as the run it continues did.
        None (a checkpoint from before BAPO saved it): decided afresh, as in a new run. A `correctness_reward` stated
        now replaces the checkpoint's decision, as it does when the user states one after the warning."""
        if saved is None:
            return
        names, source, column = list(saved["names"]), saved["source"], saved["column"]
        fits = names == self.names and source in (*SOURCES, None) and column in (None, *range(len(names)))
        if not fits:
            raise ValueError(
                f"The checkpoint decided BAPO's correctness (source {source!r}, column {column}) for the reward "
                f"functions {names}, but this trainer's reward functions are {self.names}. Resume with the "
                "checkpoint's reward functions, in the same order, or start a new run with these."
            )
        if self.source == STATED:
            if (source, column) != (STATED, self.column) and self.is_main:
                logger.warning(
                    "BAPO's correctness: %s, stated now, replaces the checkpoint's decision (source %r, column %s).",
                    self.description,
                    source,
                    column,
                )
            return
        self.source, self.column = source, column
        if self.is_main:
            logger.info("BAPO's correctness, restored from the checkpoint: %s.", self.description)


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
