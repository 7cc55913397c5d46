"""The synthetic tasks: deterministic generation, answers that verify, and a Countdown verifier that holds up
against hostile completions (it scores model output, so it must never evaluate it as Python)."""

from __future__ import annotations

import re

import pytest

from trl_bapo.builtin.rewards import load_reward
from trl_bapo.builtin.tasks import (
    ARITHMETIC,
    CARRY,
    COUNTDOWN,
    TASKS,
    arithmetic_dataset,
    arithmetic_problems,
    arithmetic_reward,
    carry_problems,
    countdown_problems,
    countdown_reward,
    exact_answer_reward,
    task_splits,
    verify_arithmetic,
    verify_countdown,
)
from trl_bapo.builtin.tiny import CHARACTERS

GENERATORS = {CARRY: carry_problems, ARITHMETIC: arithmetic_problems, COUNTDOWN: countdown_problems}


@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic_per_seed(task):
    generate = GENERATORS[task]
    assert generate(50, seed=1) == generate(50, seed=1)
    assert generate(50, seed=1) != generate(50, seed=2)


@pytest.mark.parametrize("task", TASKS)
def test_prompts_fit_the_tokenizer_and_context(task):
    for problem in GENERATORS[task](300, seed=0):
        assert set(problem["prompt"]) <= set(CHARACTERS)
        assert len(problem["prompt"]) <= 24
        assert problem["task"] == task


def test_carry_answers_and_difficulty():
    for problem in carry_problems(2000, seed=4):
        a, sign, b = re.fullmatch(r"(\d+)([+-])(\d+)=", problem["prompt"]).groups()
        a, b = int(a), int(b)
        assert a <= 99 and b <= 9
        assert int(problem["answer"]) == (a + b if sign == "+" else a - b)
        carries = (a % 10 + b >= 10) if sign == "+" else (a % 10 < b)
        expected = 3 if sign == "-" and a < b else 1 + carries
        assert problem["difficulty"] == expected, problem


def test_arithmetic_answers_and_difficulty():
    problems = arithmetic_problems(400, seed=0, min_digits=1, max_digits=4)
    assert {p["difficulty"] for p in problems} == {1, 2, 3, 4}
    signs = set()
    for problem in problems:
        a, sign, b = re.fullmatch(r"(\d+)([+-])(\d+)=", problem["prompt"]).groups()
        signs.add(sign)
        assert len(a) == len(b) == problem["difficulty"]
        assert int(problem["answer"]) == (int(a) + int(b) if sign == "+" else int(a) - int(b))
        assert set(problem["answer"]) <= set(CHARACTERS)
        assert verify_arithmetic(problem["answer"], problem["answer"])
    assert signs == {"+", "-"}
    assert any(p["answer"].startswith("-") for p in problems)


def test_countdown_solutions_verify_and_difficulty():
    problems = countdown_problems(400, seed=0, min_numbers=2, max_numbers=6)
    assert {p["difficulty"] for p in problems} == {2, 3, 4, 5, 6}
    for problem in problems:
        numbers, target = problem["numbers"], problem["target"]
        assert problem["difficulty"] == len(numbers)
        assert all(1 <= n <= 25 for n in numbers)
        assert 1 <= target <= 999
        assert problem["prompt"] == f"{','.join(map(str, numbers))}:{target}="
        assert set(problem["solution"]) <= set(CHARACTERS)
        assert verify_countdown(problem["solution"], numbers, target), problem


def test_generator_arguments_are_checked():
    with pytest.raises(ValueError):
        arithmetic_problems(1, seed=0, min_digits=3, max_digits=2)
    with pytest.raises(ValueError):
        countdown_problems(1, seed=0, max_numbers=7)


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint_deterministic_and_sized(task):
    train, heldout = task_splits(task, train_size=300, heldout_size=100, seed=0)
    assert (len(train), len(heldout)) == (300, 100)
    assert not set(train["prompt"]) & set(heldout["prompt"])
    assert len(set(train["prompt"])) == 300
    again, _ = task_splits(task, train_size=300, heldout_size=100, seed=0)
    assert again["prompt"] == train["prompt"]
    other, _ = task_splits(task, train_size=300, heldout_size=100, seed=1)
    assert other["prompt"] != train["prompt"]
    assert set(train.column_names) == set(GENERATORS[task](1, seed=0)[0])


def test_arithmetic_dataset_keeps_its_signature():
    dataset = arithmetic_dataset(64, seed=3)
    assert len(dataset) == 64
    assert max(dataset["difficulty"]) <= 3


def test_reward_functions_follow_the_trl_signature():
    assert load_reward(ARITHMETIC).__wrapped__ is arithmetic_reward
    assert load_reward(COUNTDOWN).__wrapped__ is countdown_reward
    assert exact_answer_reward.__name__.isidentifier()
    rewards = arithmetic_reward(
        completions=["168", " 168 ", "167"], answer=["168"] * 3, prompts=["123+45="] * 3, trainer_state=None
    )
    assert rewards == [1.0, 1.0, 0.0]
    rewards = countdown_reward(
        completions=["3*5", "3+5", "x"], numbers=[[3, 5, 7]] * 3, target=[15] * 3, prompts=["3,5,7:15="] * 3
    )
    assert rewards == [1.0, 0.0, 0.0]
    assert all(isinstance(r, float) for r in rewards)


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(ValueError, match="'arithmetic', 'carry', 'countdown'"):
        load_reward("chess")
    with pytest.raises(ValueError, match="arithmetic, countdown"):
        task_splits("chess", 1, 1, seed=0)


@pytest.mark.parametrize(
    ("answer", "numbers", "target"),
    [
        ("3*5", [3, 5, 7], 15),
        ("(3 + 5) * 7", [3, 5, 7], 56),
        (" 7 - ( 5 - 3 ) ", [3, 5, 7], 5),
        ("6/3*4", [6, 3, 4], 8),
        ("(7+5)/3", [3, 5, 7], 4),
        ("5", [3, 5, 7], 5),
        ("5*5", [5, 5, 2], 25),
        ("((3))*((5))", [3, 5], 15),
    ],
)
def test_valid_countdown_answers_are_accepted(answer, numbers, target):
    assert verify_countdown(answer, numbers, target)


@pytest.mark.parametrize(
    ("answer", "numbers", "target"),
    [
        ("__import__('os').system('ls')", [3, 5, 7], 0),
        ("9**9**9", [9, 9, 9], 9),
        ("3*5; 1", [3, 5, 1], 15),
        ("(" * 19 + "3" + ")" * 19, [3], 3),
        ("+".join(["1"] * 100), [1] * 100, 100),
        ("3/0", [3, 0], 0),
        ("3/(5-5)", [3, 5, 5], 0),
        ("-3+18", [3, 18], 15),
        ("+3*5", [3, 5], 15),
        ("5*-3", [3, 5], -15),
        ("3*5*3", [3, 5, 7], 45),
        ("3*6", [3, 5, 7], 18),
        ("3*5=15", [3, 5, 15], 15),
        ("3*5 7", [3, 5, 7], 15),
        ("1e3", [1, 3], 1000),
        ("\uff13*5", [3, 5], 15),
        ("100*100*100*100", [100, 100, 100, 100], 100_000_000),
        ("100*100*100*100/100/100", [100] * 6, 10_000),
        ("1/999/999/999*999*999*999", [1] + [999] * 6, 1),
        ("03*5", [3, 5], 15),
        ("3*5", [3, 5], 16),
        ("(3*5", [3, 5], 15),
        ("3*5)", [3, 5], 15),
        ("3*", [3, 5], 3),
        ("()", [3, 5], 0),
        ("", [3, 5], 0),
        ("   ", [3, 5], 0),
        ("3*5\n", [3, 5], 15),
    ],
)
def test_hostile_or_wrong_countdown_answers_are_rejected(answer, numbers, target):
    assert not verify_countdown(answer, numbers, target)


def test_countdown_limits_are_inclusive():
    assert verify_countdown("100*100*100", [100, 100, 100], 1_000_000)
    assert not verify_countdown("100*100*100+1", [100, 100, 100, 1], 1_000_001)
    sum_of_ones = "1+" * 31 + "1"  # 63 characters
    assert verify_countdown(" " + sum_of_ones, [1] * 32, 32)
    assert not verify_countdown("  " + sum_of_ones, [1] * 32, 32)
    assert verify_countdown("(" * 16 + "3" + ")" * 16, [3], 3)
    assert not verify_countdown("(" * 17 + "3" + ")" * 17, [3], 3)


def test_word_problems_are_conversational_deterministic_and_checked_on_the_last_number():
    from trl_bapo.builtin.tasks import WORD_PROBLEMS, verify_word_problem, word_problems

    problems = word_problems(200, seed=3, max_digits=2)
    assert problems == word_problems(200, seed=3, max_digits=2)
    for problem in problems:
        assert problem["prompt"][0]["role"] == "user" and problem["task"] == WORD_PROBLEMS
        assert problem["prompt"][0]["content"].endswith("Answer with the number only.")
        assert int(problem["answer"]) >= 0  # counts of things: subtraction never goes below zero
    assert verify_word_problem("She has 19 left, so the answer is 19.", "19")
    assert not verify_word_problem("19 minus 7 is 12", "19")  # the last number is the answer given
    assert not verify_word_problem("nineteen", "19")
