"""The one registry of rewards that `trl-bapo` and the showcase load by name.

TRL's rewards go by the names `trl grpo` gives them; the synthetic tasks' verifiers by their task's name. Any
other name is a dotted import path, with the current directory importable first, as in `trl grpo`.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from trl.import_utils import is_math_verify_available

from trl_bapo.builtin.tasks import (
    ARITHMETIC,
    CARRY,
    COUNTDOWN,
    WORD_PROBLEMS,
    arithmetic_reward,
    countdown_reward,
    ends_with_number_reward,
    word_problem_reward,
)

RewardFunc = Callable[..., list[float | None]]
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# As `trl grpo` (trl 1.16.0, trl/scripts/grpo.py) builds its soft overlong punishment.
SOFT_OVERLONG = dict(max_completion_len=1280, soft_punish_cache=256)


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


def _trl_reward(name: str, needs_math_verify: bool = False) -> Callable[[], RewardFunc]:
    """Loads `trl.rewards.<name>` when asked for, so that TRL's rewards are imported only by runs that use them."""

    def load() -> RewardFunc:
        # Checked here rather than at the first reward call, which comes only after a whole rollout was generated.
        if needs_math_verify and not is_math_verify_available():
            raise ImportError(f"reward {name!r} needs the math-verify package: pip install 'trl-bapo[math]'")
        return getattr(importlib.import_module("trl.rewards"), name)

    return load


REWARDS: dict[str, Callable[[], RewardFunc]] = {
    "accuracy_reward": _trl_reward("accuracy_reward", needs_math_verify=True),
    "reasoning_accuracy_reward": _trl_reward("reasoning_accuracy_reward", needs_math_verify=True),
    "think_format_reward": _trl_reward("think_format_reward"),
    "get_soft_overlong_punishment": lambda: _trl_reward("get_soft_overlong_punishment")()(**SOFT_OVERLONG),
    CARRY: lambda: _on_answer(arithmetic_reward),
    ARITHMETIC: lambda: _on_answer(arithmetic_reward),
    COUNTDOWN: lambda: _on_answer(countdown_reward),
    WORD_PROBLEMS: lambda: word_problem_reward,
    "ends-with-number": lambda: ends_with_number_reward,
}


def load_reward(name: str) -> RewardFunc:
    """The reward function registered as `name`, or the function at dotted import path `name`."""
    if name in REWARDS:
        return REWARDS[name]()
    if "." in name:
        module, attribute = name.rsplit(".", 1)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return getattr(importlib.import_module(module), attribute)
    raise ValueError(f"unknown reward function {name!r}; use one of {sorted(REWARDS)} or a dotted import path")
