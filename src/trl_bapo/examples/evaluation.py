"""Per-prompt accuracy of a model on a task: held-out accuracy and unlock rates (accuracy bins are the library's,
`trl_bapo.tracking`).

Completions are sampled with `model.generate` (left-padded batches), the way the paper measures mean@G:
G samples per prompt at temperature 1, or one greedy completion.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch


@torch.no_grad()
def prompt_accuracies(
    model,
    tokenizer,
    rows: Sequence[dict[str, Any]],
    reward_func: Callable[..., list[float]],
    num_samples: int = 8,
    greedy: bool = False,
    max_new_tokens: int = 8,
    batch_size: int = 256,
    seed: int = 0,
) -> list[float]:
    """Share of correct completions per prompt (num_samples samples at temperature 1, or 1 greedy)."""
    samples = 1 if greedy else num_samples
    expanded = [row for row in rows for _ in range(samples)]
    was_training = model.training
    model.eval()
    completions = []
    # The evaluation's own seed, without moving the global generator that training draws from.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            for start in range(0, len(expanded), batch_size):
                chunk = expanded[start : start + batch_size]
                encoded = tokenizer(
                    [row["prompt"] for row in chunk], return_tensors="pt", padding=True, padding_side="left"
                )
                output = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=not greedy,
                    temperature=1.0 if not greedy else None,
                    top_p=1.0,
                    top_k=0,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = output[:, encoded["input_ids"].shape[1] :]
                completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        finally:
            model.train(was_training)
    columns = {key: [row[key] for row in expanded] for key in expanded[0] if key != "prompt"}
    rewards = reward_func(prompts=[row["prompt"] for row in expanded], completions=completions, **columns)
    per_prompt = torch.tensor(rewards, dtype=torch.float32).view(len(rows), samples)
    return per_prompt.mean(dim=1).tolist()


def evaluate_policy(
    model,
    tokenizer,
    heldout_rows: Sequence[dict[str, Any]],
    tracked_rows: Sequence[dict[str, Any]],
    reward_func: Callable[..., list[float]],
    num_samples: int,
    seed: int = 0,
    tracked_samples: int | None = None,
) -> dict[str, Any]:
    """Held-out accuracy (mean over `num_samples` samples, and greedy) and the per-prompt accuracy of a fixed set
    of training prompts (over `tracked_samples` samples, `num_samples` by default), the measures `make demo` and
    `make bench` report."""
    sampled = prompt_accuracies(model, tokenizer, heldout_rows, reward_func, num_samples=num_samples, seed=seed)
    greedy = prompt_accuracies(model, tokenizer, heldout_rows, reward_func, greedy=True)
    samples = tracked_samples or num_samples
    return {
        "heldout": statistics.fmean(sampled),
        "heldout_per_prompt": sampled,
        "greedy": statistics.fmean(greedy),
        "tracked": (
            prompt_accuracies(model, tokenizer, tracked_rows, reward_func, num_samples=samples, seed=seed)
            if tracked_rows
            else []
        ),
    }


def unlock_rate(before: Sequence[float], after: Sequence[float]) -> float:
    """Share of the prompts at 0/G before training that reach at least 1/G after it."""
    unsolved = [b_after for b_before, b_after in zip(before, after) if b_before == 0]
    return sum(a > 0 for a in unsolved) / len(unsolved) if unsolved else 0.0


def relock_rate(before: Sequence[float], after: Sequence[float]) -> float:
    """Share of the prompts solved at least once (>= 1/G) before training that fall to 0/G after it: the control
    for `unlock_rate`, since a policy that only moves at random unlocks and relocks alike."""
    solved = [a for b, a in zip(before, after) if b > 0]
    return sum(a == 0 for a in solved) / len(solved) if solved else 0.0
