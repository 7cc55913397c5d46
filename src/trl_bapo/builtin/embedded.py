"""The embedded default: the tiny model, warm-started on a synthetic task, shipped in the package.

`make demo`, `make bench`, the tests and `recipes/demo.yaml` run on it, with no download. The warm start
leaves a spread of difficulty (many prompts at 0/G, some mixed, some solved), the regime BAPO is for. Its weights
are built once (`make weights`) and shipped, since the warm start's result depends on the CPU it runs on; a task or
warm start that is not shipped is built on first use and cached under a key naming this machine's kernel path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
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
# Bump when the tiny model or its warm start changes, so stale caches of models built here are rebuilt.
WARM_START_VERSION = 3
# Short on purpose: the warm start stops at partial competence (sampled accuracy well below greedy), which RL can
# sharpen, with a tail of prompts at 0/8 (README, "The embedded default").
WARM_START_STEPS = 1500
HELDOUT_SIZE = 200
TRAIN_SIZES = {CARRY: 1800}  # carry has 2000 distinct problems; the others 2000 training prompts of many more
# The stated band of the embedded default's base held-out mean@8: room for RL to move it both ways.
BAND = (0.15, 0.6)
EVAL_SAMPLES = GROUP_SIZE  # mean@8: the held-out measure of `make demo`, `make bench` and the manifest

# Models built once (`make weights`, trl_bapo.examples.weights) and shipped in the package, so that every machine
# starts from the same weights: the warm start's result depends on the CPU's kernel path and thread count, its
# evaluation does not. The embedded default, and the paper regime's candidate warm starts.
SHIPPED_DIR = Path(__file__).parent / "weights"


def model_name(task: str, seed: int, warm_start_steps: int) -> str:
    size = "h{hidden_size}-l{layers}".format(**MODEL_SIZE)
    return f"tiny-{task}-{size}-steps{warm_start_steps}-seed{seed}"


SHIPPED = {
    model_name(task, 0, steps): dict(task=task, warm_start_steps=steps, seed=0, size=MODEL_SIZE)
    for task, steps in ((CARRY, WARM_START_STEPS), (CARRY, 400), (CARRY, 700), (ARITHMETIC, WARM_START_STEPS))
}
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "warm_start.json"  # beside a model built on this machine: its hash and the kernel path it ran on


def cache_dir() -> Path:
    return Path(os.environ.get("TRL_BAPO_CACHE", Path.home() / ".cache" / "trl-bapo"))


def warm_start_pairs(task: str, seed: int) -> list[tuple[str, str]]:
    """Supervised (prompt, answer) pairs drawn from their own seed, apart from the RL prompts' seed."""
    if task == CARRY:
        return [(row["prompt"], row["answer"]) for row in carry_problems(20_000, seed=seed + 10_000)]
    if task == ARITHMETIC:
        return [(row["prompt"], row["answer"]) for row in arithmetic_problems(20_000, seed=seed + 10_000)]
    return [(row["prompt"], row["solution"]) for row in countdown_problems(20_000, seed=seed + 10_000)]


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a model directory's weights file: what a results file records as the model it started from."""
    return hashlib.sha256((Path(path) / WEIGHTS_FILE).read_bytes()).hexdigest()


KERNEL_SETTINGS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def kernel_path() -> dict[str, Any]:
    """How torch computes on this process: ATen's CPU capability, the environment settings that narrow MKL's and
    oneDNN's instruction sets, the thread count, and the CPU's vector flags. Every figure the project states names
    it, since training on another kernel path rounds differently."""
    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile"}),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        **{name: os.environ[name] for name in KERNEL_SETTINGS if name in os.environ},
    }


@functools.cache
def shipped_manifest() -> dict[str, dict[str, Any]]:
    """The shipped models' records: hash, base held-out accuracy, and the kernel path that built them."""
    path = SHIPPED_DIR / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


@functools.cache
def _verified(path: Path, expected: str) -> Path:
    found = weights_sha256(path) if (path / WEIGHTS_FILE).exists() else "missing"
    if found != expected:
        raise RuntimeError(
            f"The weights in {path} are not the ones recorded for it (sha256 {found[:12]}, recorded "
            f"{expected[:12]}): they were changed or damaged. "
            + (
                "Reinstall trl-bapo, or rebuild the shipped models with `make weights`."
                if path.parent == SHIPPED_DIR
                else f"Delete {path} and it is rebuilt on next use."
            )
        )
    return path


def embedded_model(task: str = CARRY, seed: int = 0, warm_start_steps: int = WARM_START_STEPS) -> Path:
    """Path of the warm-started tiny model for `task`: the shipped copy where there is one (the same weights on
    every machine, checked against their recorded hash), else built here on first use (a few minutes on 2 cores)
    and cached under a key that names this machine's kernel path and thread count, since the build depends on
    them."""
    name = model_name(task, seed, warm_start_steps)
    if name in SHIPPED:
        if name not in shipped_manifest():
            raise RuntimeError(f"The shipped model {name} is missing from this installation; run `make weights`.")
        return _verified(SHIPPED_DIR / name, shipped_manifest()[name]["sha256"])
    path_key = kernel_path()
    path = cache_dir() / f"{name}-{path_key['cpu_capability']}-t{path_key['torch_threads']}-v{WARM_START_VERSION}"
    if not path.is_dir():
        build_tiny_model(
            path,
            seed=seed,
            warm_start_pairs=warm_start_pairs(task, seed),
            warm_start_steps=warm_start_steps,
            **MODEL_SIZE,
        )
        if not (path / RECORD_FILE).exists():
            (path / RECORD_FILE).write_text(json.dumps({"sha256": weights_sha256(path), "built_on": path_key}))
    record = path / RECORD_FILE  # missing only where a build was stopped between its rename and this record
    return _verified(path, json.loads(record.read_text())["sha256"] if record.exists() else "unrecorded")


def embedded_datasets(task: str = CARRY, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Train and held-out prompts for `task`, disjoint and fixed by `seed`."""
    return task_splits(task, train_size=TRAIN_SIZES.get(task, 2000), heldout_size=HELDOUT_SIZE, seed=seed)
