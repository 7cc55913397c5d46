"""`make bench`: GRPO, DAPO and BAPO (with its ablations) side by side on the embedded default.

Every method trains the same warm-started tiny model on the same prompts for the same number of optimizer
steps with the same shared settings; only the method's own switches differ. GRPO runs on `trl.GRPOTrainer`
itself. Each run records held-out accuracy, rollouts, wall time, unlock rate, zero-variance share and batch
fill, and its peak memory (each run in a fresh process, so peaks do not carry over from one run to the next);
`bench/results.json` holds the records and `bench/RESULTS.md` the medians over seeds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from trl_bapo import BAPOConfig, BAPOTrainer
from trl_bapo.embedded import GROUP_SIZE, PROMPTS_PER_STEP, TRAINING, embedded_datasets, embedded_model
from trl_bapo.evaluation import accuracy_bins, evaluate_policy, prompt_accuracies, relock_rate, unlock_rate
from trl_bapo.plots import plot_accuracy_bins, plot_composition, plot_reward
from trl_bapo.tasks import ARITHMETIC, TASKS, reward_function
from trl_bapo.tiny import load_tiny_model

TRACKED_PROMPTS = 256
# Every evaluation samples with this seed (the base model's too): common random numbers keep the unlock rate
# and accuracy differences about the weights, not about which samples were drawn.
EVAL_SEED = 0

OFF = dict(rollout_delay=1, use_difficult_replay=False, use_high_quality_replay=False, kl_reference="ref")
METHODS: dict[str, dict] = {
    "grpo": {},
    "dapo": dict(OFF, online_filter="range", dynamic_sampling=True, epsilon_high=0.28),
    "bapo": {},
    "bapo_no_x2": dict(use_difficult_replay=False),
    "bapo_no_x3": dict(use_high_quality_replay=False),
    "bapo_mini": dict(mini_test=True),
}


def run_method(method: str, seed: int, steps: int, task: str, output_dir: Path, tracked_before: Sequence[float]) -> dict:
    """Trains one method from the embedded model and measures it; returns the run record. `tracked_before` holds
    the base model's accuracy on the first training prompts, the ones whose unlock and relock are measured."""
    model_path = embedded_model(task)
    train, heldout = embedded_datasets(task)
    reward = reward_function(task)
    common = dict(TRAINING, output_dir=str(output_dir / f"{method}-{seed}"), max_steps=steps, seed=seed)
    if method == "grpo":
        trainer = GRPOTrainer(model=str(model_path), reward_funcs=reward, args=GRPOConfig(**common), train_dataset=train)
    else:
        args = BAPOConfig(**common, **METHODS[method])
        trainer = BAPOTrainer(model=str(model_path), reward_funcs=reward, args=args, train_dataset=train)
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    memory = peak_memory()

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    heldout_rows = list(heldout)
    tracked = [train[i] for i in range(len(tracked_before))]
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    after = evaluate_policy(trainer.model, tokenizer, heldout_rows, tracked, reward, GROUP_SIZE, seed=EVAL_SEED)
    tracked_after = after["tracked"]
    record = {
        "method": method,
        "seed": seed,
        "task": task,
        "steps": steps,
        "rollouts": logs[-1].get("bapo/rollouts", steps * PROMPTS_PER_STEP * GROUP_SIZE),
        "wall_seconds": wall,
        "seconds_per_step": wall / steps,
        **memory,
        "eval_accuracy": after["heldout"],
        "eval_accuracy_greedy": after["greedy"],
        "unlock_rate": unlock_rate(tracked_before, tracked_after),
        "relock_rate": relock_rate(tracked_before, tracked_after),
        "zero_std_fraction": statistics.fmean(entry["frac_reward_zero_std"] for entry in logs),
        "batch_fill": statistics.fmean(entry.get("bapo/batch_fill", 1.0) for entry in logs),
        "reward_curve": [entry["reward"] for entry in logs],
        "tracked_bins": accuracy_bins(tracked_after, GROUP_SIZE),
    }
    if method == "bapo":
        record["composition"] = [
            {key: entry[key] for key in ("bapo/x1", "bapo/x2", "bapo/x3")} for entry in logs
        ]
    return record


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process so far in MiB, and on a GPU the peak allocated CUDA memory."""
    memory = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        memory["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def run_in_fresh_process(*args) -> dict:
    """`run_method` in a new process, so that its peak memory is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_method, args)


def base_accuracies(task: str, count: int = TRACKED_PROMPTS) -> list[float]:
    """Per-prompt accuracy of the base model on the first `count` training prompts (fixed evaluation seed)."""
    model_path = embedded_model(task)
    train, _ = embedded_datasets(task)
    return prompt_accuracies(
        load_tiny_model(model_path),
        AutoTokenizer.from_pretrained(model_path),
        [train[i] for i in range(count)],
        reward_function(task),
        num_samples=GROUP_SIZE,
        seed=EVAL_SEED,
    )


def summarize(records: list[dict], base_bins: list[int], output: Path, seconds: float) -> str:
    """Writes the plots and returns RESULTS.md: medians with min-max per method, and the targets."""
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    metrics = ["eval_accuracy", "eval_accuracy_greedy", "rollouts", "unlock_rate", "relock_rate",
               "zero_std_fraction", "batch_fill", "seconds_per_step", "peak_rss_mib"]
    median = {m: {k: statistics.median(r[k] for r in records if r["method"] == m) for k in metrics} for m in methods}

    def cell(method: str, key: str, digits: int) -> str:
        values = [r[key] for r in records if r["method"] == method]
        return f"{median[method][key]:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    rows = [
        f"| {m} | {cell(m, 'eval_accuracy', 3)} | {cell(m, 'eval_accuracy_greedy', 3)} | {cell(m, 'rollouts', 0)} "
        f"| {cell(m, 'unlock_rate', 3)} | {cell(m, 'relock_rate', 3)} | {cell(m, 'zero_std_fraction', 2)} "
        f"| {cell(m, 'batch_fill', 2)} "
        f"| {cell(m, 'seconds_per_step', 3)} | {cell(m, 'peak_rss_mib', 0)} |"
        for m in methods
    ]
    curves = {m: [statistics.median(v) for v in zip(*(r["reward_curve"] for r in records if r["method"] == m))]
              for m in methods}
    plot_reward(curves, output / "reward.png", title="Training reward (median over seeds)")
    bapo_runs = [r for r in records if r["method"] == "bapo"]
    if bapo_runs:
        plot_composition(bapo_runs[0]["composition"], PROMPTS_PER_STEP, output / "composition.png")
        plot_accuracy_bins(base_bins, bapo_runs[0]["tracked_bins"], output / "accuracy_bins.png")
    targets = _targets(median) if {"grpo", "dapo", "bapo"} <= set(methods) else []
    seeds = sorted({r["seed"] for r in records})
    return "\n".join([
        "# Benchmark: GRPO vs DAPO vs BAPO on the embedded default",
        "",
        f"Task `{records[0]['task']}`, {records[0]['steps']} optimizer steps per run, seeds {seeds}, "
        f"G = {GROUP_SIZE}, {PROMPTS_PER_STEP} prompts per rollout step. Medians over seeds, (min-max).",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, {platform.platform()}; "
        f"commit {_commit()}; whole run {seconds / 60:.1f} min.",
        "",
        "| method | held-out mean@8 | held-out greedy | rollouts | unlock rate | relock rate | zero-std share "
        "| batch fill | s / step | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## Targets (same run, medians)",
        "",
        *targets,
        "",
        "![reward](reward.png) ![composition](composition.png) ![bins](accuracy_bins.png)",
        "",
    ])


def _targets(median: dict) -> list[str]:
    bapo, grpo, dapo = median["bapo"], median["grpo"], median["dapo"]

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("inf")

    checks = [
        ("BAPO held-out accuracy >= 1.10 x GRPO", ratio(bapo["eval_accuracy"], grpo["eval_accuracy"]), 1.10, True),
        ("BAPO accuracy >= DAPO's", ratio(bapo["eval_accuracy"], dapo["eval_accuracy"]), 1.0, True),
        ("BAPO rollouts <= 0.5 x DAPO's", ratio(bapo["rollouts"], dapo["rollouts"]), 0.5, False),
        ("BAPO unlock rate >= 1.5 x GRPO", ratio(bapo["unlock_rate"], grpo["unlock_rate"]), 1.5, True),
        ("BAPO s/step <= 1.15 x GRPO", ratio(bapo["seconds_per_step"], grpo["seconds_per_step"]), 1.15, False),
    ]
    memory = f"- BAPO peak RSS / GRPO's: {ratio(bapo['peak_rss_mib'], grpo['peak_rss_mib']):.2f} (reported, no target)"
    return [
        f"- {name}: ratio {value:.2f} -> {'met' if (value >= bound if at_least else value <= bound) else 'MISSED'}"
        for name, value, bound, at_least in checks
    ] + [memory]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--task", default=ARITHMETIC, choices=TASKS)
    parser.add_argument("--output-dir", default="bench")
    parser.add_argument(
        "--tracked-prompts", type=int, default=TRACKED_PROMPTS, help="training prompts whose unlock is measured"
    )
    options = parser.parse_args(argv)
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = base_accuracies(options.task, options.tracked_prompts)
    records = []
    # Methods interleave within each seed so that machine load drifts hit every method alike.
    for seed in options.seeds:
        for method in options.methods:
            record = run_in_fresh_process(method, seed, options.steps, options.task, output / "runs", base)
            records.append(record)
            print(
                f"{method:>11} seed {seed}: held-out {record['eval_accuracy']:.3f} greedy "
                f"{record['eval_accuracy_greedy']:.3f} rollouts {record['rollouts']:.0f} unlock "
                f"{record['unlock_rate']:.3f} relock {record['relock_rate']:.3f} fill {record['batch_fill']:.2f} "
                f"{record['wall_seconds']:.0f}s peak RSS {record['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
            (output / "results.json").write_text(json.dumps(records, indent=1))
    report = summarize(records, accuracy_bins(base, GROUP_SIZE), output, time.perf_counter() - started)
    (output / "RESULTS.md").write_text(report)
    print(report)
    return records


if __name__ == "__main__":
    main()
