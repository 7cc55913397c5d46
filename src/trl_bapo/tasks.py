"""Synthetic tasks with verifiable answers, generated deterministically from a seed."""

from __future__ import annotations

import random

from datasets import Dataset


def arithmetic_problems(count: int, seed: int, max_digits: int = 3) -> list[dict[str, str | int]]:
    """Additions "a+b=" whose operands have 1 to `max_digits` digits; `digits` labels the difficulty."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        digits = rng.randint(1, max_digits)
        a, b = (rng.randint(0, 10**digits - 1) for _ in range(2))
        problems.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "digits": digits})
    return problems


def arithmetic_dataset(count: int, seed: int, max_digits: int = 3) -> Dataset:
    return Dataset.from_list(arithmetic_problems(count, seed, max_digits))


def exact_answer_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion, stripped of spaces, is exactly the answer; TRL reward-function signature."""
    return [float(completion.strip() == expected) for completion, expected in zip(completions, answer)]
