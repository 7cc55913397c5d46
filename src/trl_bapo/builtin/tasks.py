"""Synthetic RL tasks with verifiable answers, generated deterministically from a seed.

The tiny model's tasks (`TASKS`) use only its characters (`trl_bapo.builtin.tiny.CHARACTERS`), and their prompts stay
within 24 characters so they fit its 128-token context with room to answer. The chat tasks (`CHAT_TASKS`) are for
a real instruction-tuned model: conversational prompts, answers checked in free text.
"""

from __future__ import annotations

import operator
import random
import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction

from datasets import Dataset

CARRY = "carry"
ARITHMETIC = "arithmetic"
COUNTDOWN = "countdown"
WORD_PROBLEMS = "word-problems"
TASKS = (CARRY, ARITHMETIC, COUNTDOWN)
CHAT_TASKS = (WORD_PROBLEMS,)

# Limits that keep prompts within 24 characters: "a-b=" takes 2 * digits + 2, and Countdown prompts
# ("25,...,25:999=") take 3 * numbers + 4.
_MAX_DIGITS = 11
_MAX_NUMBERS = 6
_MAX_SOURCE = 25
_MAX_TARGET = 999

# Bounds on what the Countdown verifier will evaluate: answers come from a model and may be hostile.
_COUNTDOWN_CHARACTERS = frozenset("0123456789+-*/() ")
_MAX_ANSWER_LENGTH = 64
_MAX_DEPTH = 16
_MAX_MAGNITUDE = 10**6
_OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_NUMBER_PRECEDENCE = 3
_Term = tuple[int, str, int]  # (value, text, precedence) of a partial Countdown solution


def _check_range(name: str, low: int, high: int, limit: int) -> None:
    if not 1 <= low <= high <= limit:
        raise ValueError(f"need 1 <= min_{name} <= max_{name} <= {limit}, got {low} and {high}")


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def arithmetic_problems(count: int, seed: int, min_digits: int = 1, max_digits: int = 4) -> list[dict]:
    """Additions and subtractions "a+b=" / "a-b="; the operands' digit count labels the difficulty."""
    _check_range("digits", min_digits, max_digits, _MAX_DIGITS)
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        digits = rng.randint(min_digits, max_digits)
        a, b = _operand(rng, digits), _operand(rng, digits)
        sign = rng.choice("+-")
        answer = a + b if sign == "+" else a - b
        problems.append({"prompt": f"{a}{sign}{b}=", "answer": str(answer), "difficulty": digits, "task": ARITHMETIC})
    return problems


def carry_problems(count: int, seed: int, max_first: int = 99, max_second: int = 9) -> list[dict]:
    """ "a+b=" / "a-b=" with a up to two digits and b one digit, graded by what the sum asks: difficulty 1 needs no
    carry or borrow ("42+5="), 2 a carry or borrow ("47+5=", "42-5="), 3 gives a negative number ("4-7=")."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        a, b = rng.randrange(max_first + 1), rng.randrange(max_second + 1)
        sign = rng.choice("+-")
        if sign == "+":
            answer, difficulty = a + b, 1 + (a % 10 + b >= 10)
        else:
            answer, difficulty = a - b, 3 if a < b else 1 + (a % 10 < b)
        problems.append({"prompt": f"{a}{sign}{b}=", "answer": str(answer), "difficulty": difficulty, "task": CARRY})
    return problems


def arithmetic_dataset(count: int, seed: int, max_digits: int = 3) -> Dataset:
    """Arithmetic problems as a Dataset, the form TRL trainers take."""
    return Dataset.from_list(arithmetic_problems(count, seed, max_digits=max_digits))


_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas")
_THINGS = ("apples", "books", "coins", "marbles", "stamps", "shells", "cards", "pencils")
_WORD_TEMPLATES = {
    "+": "{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?",
    "-": "{name} has {a} {things} and gives {b} of them away. How many {things} does {name} have left?",
}
_WORD_INSTRUCTION = "Answer with the number only."
_INTEGER = re.compile(r"-?\d+")


def word_problems(count: int, seed: int, min_digits: int = 1, max_digits: int = 3) -> list[dict]:
    """Addition and subtraction word problems as conversational prompts; operand digits label the difficulty.
    Subtractions never go below zero, so every answer is a count."""
    _check_range("digits", min_digits, max_digits, _MAX_DIGITS)
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        digits = rng.randint(min_digits, max_digits)
        a, b = sorted((_operand(rng, digits), _operand(rng, digits)), reverse=True)
        sign = rng.choice("+-")
        question = _WORD_TEMPLATES[sign].format(name=rng.choice(_NAMES), things=rng.choice(_THINGS), a=a, b=b)
        problems.append(
            {
                "prompt": [{"role": "user", "content": f"{question} {_WORD_INSTRUCTION}"}],
                "answer": str(a + b if sign == "+" else a - b),
                "difficulty": digits,
                "task": WORD_PROBLEMS,
            }
        )
    return problems


def verify_word_problem(completion: str, answer: str) -> bool:
    """The last integer of the reply is the answer: a chat model may wrap the number in a sentence."""
    numbers = _INTEGER.findall(completion)
    return bool(numbers) and numbers[-1] == answer


def _combine(left: _Term, right: _Term, op: str, value: int) -> _Term:
    """Joins two (value, text, precedence) terms, adding only the parentheses that keep evaluation order."""
    _, left_text, left_precedence = left
    _, right_text, right_precedence = right
    precedence = _PRECEDENCE[op]
    if left_precedence < precedence:
        left_text = f"({left_text})"
    # A right operand of equal precedence is wrapped too, so the verifier evaluates in exactly the order the
    # generator did and sees the same (bounded) intermediate values.
    if right_precedence <= precedence:
        right_text = f"({right_text})"
    return value, f"{left_text}{op}{right_text}", precedence


def _countdown_problem(rng: random.Random, size: int) -> dict:
    numbers = [rng.randint(1, _MAX_SOURCE) for _ in range(size)]
    terms = [(n, str(n), _NUMBER_PRECEDENCE) for n in numbers]
    rng.shuffle(terms)
    while len(terms) > 1:
        smaller, larger = sorted((terms.pop(rng.randrange(len(terms))), terms.pop(rng.randrange(len(terms)))))
        a, b = larger[0], smaller[0]
        # Keeping every intermediate a positive integer <= the target limit makes every problem solvable
        # exactly; one op always qualifies (a - b when a > b, else a / a).
        candidates = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if a % b == 0 else 0}
        op = rng.choice([op for op, value in candidates.items() if 0 < value <= _MAX_TARGET])
        terms.append(_combine(larger, smaller, op, candidates[op]))
    target, solution, _ = terms[0]
    return {
        "prompt": f"{','.join(map(str, numbers))}:{target}=",
        "numbers": numbers,
        "target": target,
        "solution": solution,
        "difficulty": size,
        "task": COUNTDOWN,
    }


def countdown_problems(count: int, seed: int, min_numbers: int = 3, max_numbers: int = 4) -> list[dict]:
    """Countdown problems built from a random expression over all the numbers, so each has a solution."""
    _check_range("numbers", min_numbers, max_numbers, _MAX_NUMBERS)
    rng = random.Random(seed)
    return [_countdown_problem(rng, rng.randint(min_numbers, max_numbers)) for _ in range(count)]


def verify_arithmetic(completion: str, answer: str) -> bool:
    """Exact match, ignoring surrounding whitespace the model may emit."""
    return completion.strip() == answer


class _CountdownParser:
    """Recursive descent over `expression := term (+|- term)*`, `term := factor (*|/ factor)*`,
    `factor := source number | ( expression )`; raises ValueError on anything else."""

    def __init__(self, tokens: list[str], numbers: list[int]):
        self.tokens = tokens
        self.position = 0
        self.available = Counter(numbers)
        self.depth = 0

    def parse(self) -> Fraction:
        value = self._expression()
        if self.position != len(self.tokens):
            raise ValueError("trailing input")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise ValueError("unexpected end")
        self.position += 1
        return token

    def _expression(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            value = _apply(self._take(), value, self._term())
        return value

    def _term(self) -> Fraction:
        value = self._factor()
        while self._peek() in ("*", "/"):
            value = _apply(self._take(), value, self._factor())
        return value

    def _factor(self) -> Fraction:
        token = self._take()
        if token == "(":
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise ValueError("nested too deeply")
            value = self._expression()
            if self._take() != ")":
                raise ValueError("unclosed parenthesis")
            self.depth -= 1
            return value
        # Anything but a number here (a sign, an operator) is rejected: only source numbers are operands.
        if not token.isdigit():
            raise ValueError(f"expected a number, got {token!r}")
        number = int(token)
        if token != str(number) or self.available[number] == 0:
            raise ValueError(f"{token} is not an unused source number")
        self.available[number] -= 1
        return Fraction(number)


def _apply(op: str, left: Fraction, right: Fraction) -> Fraction:
    if op == "/" and right == 0:
        raise ValueError("division by zero")
    value = _OPERATIONS[op](left, right)
    if abs(value) > _MAX_MAGNITUDE or value.denominator > _MAX_MAGNITUDE:
        raise ValueError("value out of bounds")
    return value


def verify_countdown(completion: str, numbers: list[int], target: int) -> bool:
    """True when the completion is an expression over the source numbers (each at most once) equal to target.

    The expression is parsed here, never evaluated by Python, because it comes from the model.
    """
    if not 0 < len(completion) <= _MAX_ANSWER_LENGTH or not set(completion) <= _COUNTDOWN_CHARACTERS:
        return False
    # The character check makes [0-9] and \S cover every token; spaces only separate them.
    tokens = re.findall(r"[0-9]+|\S", completion)
    try:
        return _CountdownParser(tokens, numbers).parse() == target
    except ValueError:
        return False


def arithmetic_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 for an exactly right answer, else 0.0; TRL passes the dataset's `answer` column."""
    return [float(verify_arithmetic(completion, right)) for completion, right in zip(completions, answer)]


exact_answer_reward = arithmetic_reward


def word_problem_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the reply's last integer is the answer, else 0.0; takes chat completions (lists of messages) as
    TRL passes them for conversational prompts, or plain text."""
    texts = [completion[-1]["content"] if isinstance(completion, list) else completion for completion in completions]
    return [float(verify_word_problem(text, right)) for text, right in zip(texts, answer)]


def ends_with_number_reward(completions: list, **kwargs) -> list[float]:
    """A format reward, 0/1: 1.0 when the reply ends on a number (the form the word problems' verifier reads)."""
    texts = [completion[-1]["content"] if isinstance(completion, list) else completion for completion in completions]
    return [float(re.search(r"\d[.!]?\s*$", text) is not None) for text in texts]


def countdown_reward(completions: list[str], numbers: list[list[int]], target: list[int], **kwargs) -> list[float]:
    """1.0 for a valid expression reaching the target, else 0.0; TRL passes `numbers` and `target` columns."""
    return [
        float(verify_countdown(completion, source, goal))
        for completion, source, goal in zip(completions, numbers, target)
    ]


_GENERATORS: dict[str, Callable[[int, int], list[dict]]] = {
    CARRY: carry_problems,
    ARITHMETIC: arithmetic_problems,
    COUNTDOWN: countdown_problems,
    WORD_PROBLEMS: word_problems,
}


def _check_task(task: str) -> None:
    if task not in TASKS + CHAT_TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS + CHAT_TASKS)}")


def task_splits(
    task: str, train_size: int, heldout_size: int, seed: int, **generator_options: int
) -> tuple[Dataset, Dataset]:
    """Train and held-out splits with no prompt in common, so held-out accuracy measures generalisation.

    `generator_options` go to the task's generator (e.g. `max_digits` or `max_numbers`)."""
    _check_task(task)
    needed = train_size + heldout_size
    count = needed
    while True:
        # Generators are prefix-stable for a seed, so asking for more problems only appends new ones.
        unique: dict[str, dict] = {}
        for problem in _GENERATORS[task](count, seed, **generator_options):
            unique.setdefault(repr(problem["prompt"]), problem)
        if len(unique) >= needed:
            break
        if count > 100 * needed:
            raise ValueError(f"{task} has too few distinct prompts for {needed} problems")
        count *= 2
    rows = list(unique.values())[:needed]
    # Held-out prompts are taken first: easy prompts are few (200 one-digit sums), and taken last they would
    # all be used up by the training split, leaving a held-out set of hard prompts only.
    return Dataset.from_list(rows[heldout_size:]), Dataset.from_list(rows[:heldout_size])
