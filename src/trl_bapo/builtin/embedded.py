"""The embedded default: the tiny model, warm-started on a synthetic task and cached on disk.

`make demo`, `make bench`, the tests and `recipes/demo.yaml` run on it, with no download. The warm start
leaves a spread of difficulty (many prompts at 0/G, some mixed, some solved), the regime BAPO is for.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset

from trl_bapo.builtin.tasks import (
    ARITHMETIC,
    CARRY,
    arithmetic_problems,
    carry_problems,
    countdown_problems,
    task_splits,
)
from trl_bapo.builtin.tiny import build_tiny_model

GROUP_SIZE = 8
PROMPTS_PER_STEP = 16
# Training settings of the embedded default, shared by `make demo` and `make bench`: G = 8 completions for 16
# prompts per rollout step, one optimizer step per rollout (two micro-batches), in float32 (bfloat16 autocast is
# emulated, and slow, on CPUs without AMX; activation checkpointing only costs time on a model this small).
TRAINING = dict(
    num_generations=GROUP_SIZE,
    per_device_train_batch_size=GROUP_SIZE * PROMPTS_PER_STEP // 2,
    gradient_accumulation_steps=2,
    max_completion_length=8,
    # GRPO's and BAPO's best of 2e-4, 5e-4 and 8e-4 (DAPO's is 8e-4; bench/SWEEP.md).
    learning_rate=5e-4,
    beta=0.001,
    temperature=1.0,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    disable_tqdm=True,
    bf16=False,
    gradient_checkpointing=False,
)

# The model: 4 layers of 128 units (4 heads of 32, a size vLLM's CPU attention also takes), about 1M parameters.
MODEL_SIZE = dict(hidden_size=128, layers=4, heads=4)
# Bump when the tiny model or its warm start changes, so stale caches are rebuilt.
WARM_START_VERSION = 3
# Short on purpose: the warm start stops at partial competence (sampled accuracy well below greedy), which RL can
# sharpen, with a tail of prompts at 0/8 (README, "The embedded default").
WARM_START_STEPS = 1500
HELDOUT_SIZE = 200
TRAIN_SIZES = {CARRY: 1800}  # carry has 2000 distinct problems; the others 2000 training prompts of many more


def cache_dir() -> Path:
    return Path(os.environ.get("TRL_BAPO_CACHE", Path.home() / ".cache" / "trl-bapo"))


def warm_start_pairs(task: str, seed: int) -> list[tuple[str, str]]:
    """Supervised (prompt, answer) pairs drawn from their own seed, apart from the RL prompts' seed."""
    if task == CARRY:
        return [(row["prompt"], row["answer"]) for row in carry_problems(20_000, seed=seed + 10_000)]
    if task == ARITHMETIC:
        return [(row["prompt"], row["answer"]) for row in arithmetic_problems(20_000, seed=seed + 10_000)]
    return [(row["prompt"], row["solution"]) for row in countdown_problems(20_000, seed=seed + 10_000)]


def embedded_model(task: str = CARRY, seed: int = 0, warm_start_steps: int = WARM_START_STEPS) -> Path:
    """Path of the warm-started tiny model for `task`, built on first use (about a minute on 2 cores)."""
    size = "h{hidden_size}-l{layers}".format(**MODEL_SIZE)
    path = cache_dir() / f"tiny-{task}-{size}-steps{warm_start_steps}-seed{seed}-v{WARM_START_VERSION}"
    return build_tiny_model(
        path, seed=seed, warm_start_pairs=warm_start_pairs(task, seed), warm_start_steps=warm_start_steps, **MODEL_SIZE
    )


def embedded_datasets(task: str = CARRY, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Train and held-out prompts for `task`, disjoint and fixed by `seed`."""
    return task_splits(task, train_size=TRAIN_SIZES.get(task, 2000), heldout_size=HELDOUT_SIZE, seed=seed)
