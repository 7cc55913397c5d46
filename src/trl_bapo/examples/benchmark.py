"""`make bench`: GRPO, DAPO and BAPO (with its ablations and loss options) side by side on the embedded default.

Every method trains the same warm-started tiny model on the same prompts for the same number of optimizer steps
with the same shared settings; only the method's own switches, and its learning rate, differ. GRPO runs on
`trl.GRPOTrainer` itself. Each run happens in a fresh process (so its peak memory is its own) and records held-out
accuracy along the way (against optimizer steps and against completions generated), unlock and relock rates,
the effective-rollout ratio, wall time and memory.

    python -m trl_bapo.examples.benchmark --sweep   # learning rates: each method's best, written to bench/sweep.json
    python -m trl_bapo.examples.benchmark           # the comparison, with the sweep's rates: bench/results.json

Learning rates come from `bench/sweep.json` (GRPO's, DAPO's and BAPO's own best; BAPO's ablations and loss
options use BAPO's). The sweep also picks the best of the off-policy REINFORCE losses for the comparison.
`bench/RESULTS.md` is regenerated with the tables and plots; the written findings live in `bench/FINDINGS.md`,
which the bench never touches. `bench/DIFFICULTY.md` holds the base model's accuracy by difficulty (the README's
table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import scipy.stats
import torch
from peft import LoraConfig
from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trl_bapo import BAPOConfig, BAPOTrainer
from trl_bapo.builtin.embedded import (
    GROUP_SIZE,
    KERNEL_SETTINGS,
    TRAINING,
    WARM_START_STEPS,
    embedded_datasets,
    embedded_model,
    kernel_path,
    weights_sha256,
)
from trl_bapo.builtin.rewards import load_reward
from trl_bapo.builtin.tasks import ARITHMETIC, CARRY
from trl_bapo.builtin.tiny import load_tiny_model
from trl_bapo.examples.callbacks import quiet_libraries
from trl_bapo.examples.evaluation import evaluate_policy, prompt_accuracies, relock_rate, unlock_rate
from trl_bapo.examples.plots import plot_accuracy_bins, plot_composition, plot_curves
from trl_bapo.tracking import accuracy_bins

# About 3% of training prompts start at 0/32: 1024 tracked give some thirty, so unlock rates are not decided by
# a handful of prompts.
TRACKED_PROMPTS = 1024
# Unlock and relock are decided per prompt: 32 samples keep one flipped token from deciding them.
TRACKED_SAMPLES = 32
EVAL_EVERY = 25  # optimizer steps between held-out evaluations during a run
# Every evaluation samples with this seed (the base model's too): common random numbers keep the differences
# about the weights, not about which samples were drawn.
EVAL_SEED = 0
SWEEP_RATES = (2e-4, 5e-4, 8e-4)
SWEPT_METHODS = ("grpo", "dapo", "bapo")
LOSS_OPTIONS = {
    "bapo_rec": dict(loss_type="rec", scale_rewards="none"),
    "bapo_asymre": dict(loss_type="asymre", scale_rewards="none"),
    "bapo_opmd": dict(loss_type="opmd", scale_rewards="none"),
}

OFF = dict(rollout_delay=1, use_difficult_replay=False, use_high_quality_replay=False, kl_reference="ref")
DAPO = dict(OFF, online_filter="range", dynamic_sampling=True, epsilon_high=0.28)
METHODS: dict[str, dict] = {
    "grpo": {},
    "dapo": DAPO,
    "bapo": {},
    "bapo_no_x2": dict(use_difficult_replay=False),
    "bapo_no_x3": dict(use_high_quality_replay=False),
    "bapo_mini": dict(mini_test=True),
    "bapo_v1": dict(rollout_delay=1),
    "bapo_adaptive": dict(loss_type="bnpo", adaptive_clipping=True),
    # Trains exactly as BAPO with per-step seeds does, generating the next step while one trains (docs/overlap.md):
    # for the wall time to a target (`make bench-overlap`), not part of the default comparison.
    "bapo_overlap": dict(rollout_sampling_seed="per_step", overlap_rollout=True),
    **LOSS_OPTIONS,
}
TIMING_METHODS = ("bapo_overlap",)  # run only when named (`--methods`)

# The paper's regime (Tables 2/3 scaled down): 32 prompts per rollout batch and 4 optimizer updates on it (2
# micro-batches each), B_bad holding one sample batch; its task is chosen by the rule in `choose_task`.
PAPER_PROMPTS = 32
PAPER_TRAINING = dict(
    TRAINING,
    per_device_train_batch_size=GROUP_SIZE * PAPER_PROMPTS // 8,
    gradient_accumulation_steps=2,
    steps_per_generation=8,
)
# The authors' code as recipes/bapo_authors.yaml runs it (docs/authors-parity.md), at this regime's batch, which is
# theirs: 32 prompts per rollout, a random 32 of a shared store of 128 re-evaluated, at most 8 high-quality groups
# once it is full, v = m = 2 refreshed at (t - 1) mod v, their X1 fallback, X2 and X3 rules, X3 band [1/8, 3/8], the
# decoupled correction with X3 anchored where it was made, clip [0.8, 1.28] with dual clip 10, their mini-batch
# aggregation, no KL.
AUTHORS = dict(
    rollout_delay=2,
    rollout_refresh_phase=1,
    reevaluation_interval=2,
    max_reevaluation_prompts=PAPER_PROMPTS,
    difficult_buffer_size=4 * PAPER_PROMPTS,
    reevaluation_order="random",
    difficult_admission="improved_or_solved",
    keep_reevaluated_prompts=True,
    cap_difficult_replay=True,
    difficult_entry_after_update=True,
    shared_buffer=True,
    high_quality_buffer_size=8,
    online_filter_fallback=True,
    high_quality_lower_range=[1 / 8, 1 / 8],
    high_quality_upper_range=[3 / 8, 3 / 8],
    off_policy_correction="decoupled",
    x3_anchor="stored",
    batch_aggregation="mini_batch",
    epsilon_high=0.28,
    delta=10.0,
    beta=0.0,
)
PAPER_METHODS: dict[str, dict] = {
    "grpo": {},
    "dapo": DAPO,
    "bapo": {},
    "bapo_decoupled": dict(off_policy_correction="decoupled"),
    "bapo_authors": AUTHORS,
    # The supply of X3 (the band's width and B_high's window decide how much of the batch X3 can fill): run on
    # the first seed for their batch fill.
    "bapo_band_authors": dict(high_quality_lower_range=[1 / 8, 1 / 8], high_quality_upper_range=[3 / 8, 3 / 8]),
    "bapo_band_wide": dict(high_quality_lower_range=[1 / 8, 1 / 8], high_quality_upper_range=[7 / 8, 7 / 8]),
    "bapo_window_6": dict(high_quality_buffer_steps=6),
}
SUPPLY_METHODS = ("bapo_band_authors", "bapo_band_wide", "bapo_window_6")
# Four seeds: at the paired spread of an earlier 6-seed check on a similar task (a standard deviation of about
# 0.007 per seed) they give a 90% half-width near 0.008, under 0.3 x a GRPO gain of 0.05; RESULTS.md reports the
# half-width each comparison reached.
PAPER_SEEDS = [0, 1, 2, 3]


# The rule that chooses the paper regime's task, fixed before any BAPO variant ran there: the first candidate (in
# this order) whose training groups start at least 60% at zero reward variance, and on which GRPO passes the gate.
PAPER_CANDIDATES = ((ARITHMETIC, WARM_START_STEPS), (CARRY, 400), (CARRY, 700))
ZERO_VARIANCE_SHARE = 0.6


@dataclasses.dataclass(frozen=True)
class Regime:
    """A benchmark setting, fixed before any method is compared: the task and its warm start, the shared training
    settings, the run length and the methods."""

    name: str
    task: str
    warm_start_steps: int
    training: dict
    steps: int
    methods: dict
    folder: str  # under the output directory
    eval_every: int
    candidates: tuple = ()  # (task, warm start steps) in order, for `choose_task`; empty: `task` as given

    @property
    def prompts_per_rollout(self) -> int:
        per_rollout = self.training["per_device_train_batch_size"] * self.training.get(
            "steps_per_generation", self.training["gradient_accumulation_steps"]
        )
        return per_rollout // GROUP_SIZE

    @property
    def updates_per_rollout(self) -> int:
        steps = self.training.get("steps_per_generation", self.training["gradient_accumulation_steps"])
        return steps // self.training["gradient_accumulation_steps"]


REGIMES = {
    "carry": Regime("carry", CARRY, WARM_START_STEPS, TRAINING, 300, METHODS, "", EVAL_EVERY),
    "paper": Regime(
        "paper",
        ARITHMETIC,
        WARM_START_STEPS,
        PAPER_TRAINING,
        600,
        PAPER_METHODS,
        "paper",
        100,
        PAPER_CANDIDATES,
    ),
}


class Progress(TrainerCallback):
    """Held-out accuracy every `regime.eval_every` optimizer steps, with the completions generated by then, and
    the completions trained on with a non-zero advantage (each training use counts: a replayed group counts
    again)."""

    def __init__(self, trainer, tokenizer, heldout_rows, reward, regime: Regime):
        self.trainer, self.tokenizer, self.heldout_rows, self.reward = trainer, tokenizer, heldout_rows, reward
        self.regime, self.curve, self.effective = regime, [], 0
        # [step, training wall seconds (evaluations left out), held-out mean@8] at each evaluation
        self.wall_curve: list[list[float]] = []
        self.started, self.evaluating = 0.0, 0.0
        compute_loss = trainer.compute_loss

        def counting_compute_loss(model, inputs, *args, **kwargs):
            trained = (inputs["completion_mask"].sum(dim=1) > 0) & (inputs["advantages"] != 0)
            self.effective += int(trained.sum())
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = counting_compute_loss

    def rollouts(self, state) -> float:
        """Completions generated so far: BAPO counts its own; GRPO generates one rollout batch per
        `updates_per_rollout` optimizer steps."""
        logs = [entry for entry in state.log_history if "reward" in entry]
        if logs and "bapo/rollouts" in logs[-1]:
            return logs[-1]["bapo/rollouts"]
        rollout_steps = -(-state.global_step // self.regime.updates_per_rollout)
        return rollout_steps * self.regime.prompts_per_rollout * GROUP_SIZE

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.regime.eval_every == 0:
            began = time.perf_counter()
            accuracy = prompt_accuracies(
                self.trainer.model, self.tokenizer, self.heldout_rows, self.reward, GROUP_SIZE, seed=EVAL_SEED
            )
            self.curve.append([state.global_step, self.rollouts(state), statistics.fmean(accuracy)])
            self.wall_curve.append([state.global_step, began - self.started - self.evaluating, self.curve[-1][2]])
            self.evaluating += time.perf_counter() - began


def run_method(
    method: str,
    seed: int,
    steps: int,
    regime: Regime,
    output_dir: Path,
    learning_rate: float,
    base: dict,
    engine: dict | None = None,
    lora: dict | None = None,
) -> dict:
    """Trains one method from the regime's warm-started model and measures it; returns the run record. `base`
    holds the base model's held-out accuracy and its accuracy on the tracked training prompts. `engine`: settings
    of the generation engine (a vLLM server's), `lora`: a LoRA adapter's (peft.LoraConfig) to train instead of the
    weights. With either, GRPO runs as BAPOTrainer with BAPO's features off (`OFF`, equal to TRL's GRPOTrainer per
    tests/test_invariants.py), since TRL's own sends a LoRA adapter to a server over NCCL only, which needs CUDA."""
    quiet_libraries()
    model_path = embedded_model(regime.task, warm_start_steps=regime.warm_start_steps)
    train, heldout = embedded_datasets(regime.task)
    reward = load_reward(regime.task)
    common = dict(
        regime.training,
        output_dir=str(output_dir / f"{method}-{seed}"),
        max_steps=steps,
        seed=seed,
        learning_rate=learning_rate,
    )
    if method == "grpo" and engine is None and lora is None:
        args = GRPOConfig(**common)
        trainer = GRPOTrainer(model=str(model_path), reward_funcs=reward, args=args, train_dataset=train)
    else:
        # A method may override a shared setting (beta).
        args = BAPOConfig(**{**common, **(OFF if method == "grpo" else regime.methods[method]), **(engine or {})})
        peft_config = LoraConfig(**lora) if lora else None
        trainer = BAPOTrainer(
            model=str(model_path), reward_funcs=reward, args=args, train_dataset=train, peft_config=peft_config
        )
    trainer.remove_callback(PrinterCallback)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    heldout_rows = list(heldout)
    progress = Progress(trainer, tokenizer, heldout_rows, reward, regime)
    trainer.add_callback(progress)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    memory = peak_memory()

    tracked = [train[i] for i in range(len(base["tracked"]))]
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    after = evaluate_policy(
        trainer.model,
        tokenizer,
        heldout_rows,
        tracked,
        reward,
        GROUP_SIZE,
        seed=EVAL_SEED,
        tracked_samples=TRACKED_SAMPLES,
    )
    rollouts = progress.rollouts(trainer.state)
    # A rollout step logs once per optimizer update; its batch fill is the step's.
    fills = [entry["bapo/batch_fill"] for entry in logs if "bapo/batch_fill" in entry]
    record = {
        "method": method,
        "seed": seed,
        "regime": regime.name,
        "task": regime.task,
        "warm_start_steps": regime.warm_start_steps,
        "updates_per_rollout": regime.updates_per_rollout,
        "steps": steps,
        "learning_rate": learning_rate,
        "rollouts": rollouts,
        "wall_seconds": wall,
        "seconds_per_step": wall / steps,
        **memory,
        "eval_accuracy": after["heldout"],
        "eval_accuracy_greedy": after["greedy"],
        "base_eval_accuracy": base["heldout"],
        "unlock_rate": unlock_rate(base["tracked"], after["tracked"]),
        "relock_rate": relock_rate(base["tracked"], after["tracked"]),
        "effective_rollout_ratio": progress.effective / rollouts,
        "zero_std_fraction": statistics.fmean(entry["frac_reward_zero_std"] for entry in logs),
        "batch_fill": statistics.fmean(fills) if fills else 1.0,
        "batch_fill_median": statistics.median(fills) if fills else 1.0,
        "reward_curve": [entry["reward"] for entry in logs],
        "heldout_curve": [[0, 0, base["heldout"]], *progress.curve],
        "wall_curve": [[0, 0.0, base["heldout"]], *progress.wall_curve],
        "tracked_bins": accuracy_bins(after["tracked"], GROUP_SIZE),
        "kernel_path": kernel_path(),
        "engine": "vllm-server" if engine else "transformers",
        "lora": lora,
    }
    if method.startswith("bapo"):
        keys = [key for key in logs[0] if key.startswith("bapo/") and key != "bapo/assembly_seconds"] if logs else []
        record["composition"] = [{key: entry[key] for key in ("bapo/x1", "bapo/x2", "bapo/x3")} for entry in logs]
        record["bapo_means"] = {key: statistics.fmean(entry[key] for entry in logs if key in entry) for key in keys}
    return record


def write_results(output: Path, gate: dict, base: dict, regime: Regime, records: list[dict]) -> dict:
    """results.json: the gate, the base model's accuracy, what the runs started from, and every run."""
    result = {
        "gate": gate,
        "base": {"heldout": base["heldout"], "greedy": base["greedy"]},
        "model": model_record(regime),
        "commit": _commit(),
        "records": records,
    }
    (output / "results.json").write_text(json.dumps(result, indent=1))
    return result


def model_record(regime: Regime) -> dict:
    """What the regime's runs started from, and how this machine computed: the warm-started model's name and weight
    hash, ATen's CPU capability, the kernel settings in force, the thread count and the CPU's vector flags."""
    path = embedded_model(regime.task, warm_start_steps=regime.warm_start_steps)
    return {"model": path.name, "weights_sha256": weights_sha256(path), **kernel_path()}


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


def base_accuracies(regime: Regime, tracked_prompts: int) -> dict:
    """The base model's held-out accuracy (per prompt too) and its accuracy on the tracked training prompts."""
    task = regime.task
    model_path = embedded_model(task, warm_start_steps=regime.warm_start_steps)
    train, heldout = embedded_datasets(task)
    tracked = [train[i] for i in range(tracked_prompts)]
    return evaluate_policy(
        load_tiny_model(model_path),
        AutoTokenizer.from_pretrained(model_path),
        list(heldout),
        tracked,
        load_reward(task),
        GROUP_SIZE,
        seed=EVAL_SEED,
        tracked_samples=TRACKED_SAMPLES,
    )


def difficulty_table(task: str, base: dict) -> str:
    """The base model's held-out accuracy by difficulty (mean@8 at temperature 1, and the share at 0/8), and the
    frontier of the tracked training prompts: the expected share of their groups of 8 that are mixed (between 1/8
    and 7/8, the groups GRPO learns from), and the share at 0/32."""
    _, heldout = embedded_datasets(task)
    rows = ["| difficulty | prompts | mean@8 | at 0/8 |", "|---|---|---|---|"]
    for level in sorted(set(heldout["difficulty"])):
        accuracies = [a for a, d in zip(base["heldout_per_prompt"], heldout["difficulty"]) if d == level]
        zero = sum(a == 0 for a in accuracies) / len(accuracies)
        rows.append(f"| {level} | {len(accuracies)} | {statistics.fmean(accuracies):.2f} | {zero:.2f} |")
    tracked = base["tracked"]
    mixed = statistics.fmean(1 - p**GROUP_SIZE - (1 - p) ** GROUP_SIZE for p in tracked)
    unsolved = sum(p == 0 for p in tracked) / len(tracked)
    rows += [
        "",
        f"Training prompts ({len(tracked)} tracked, {TRACKED_SAMPLES} samples each): {mixed:.0%} of groups of "
        f"{GROUP_SIZE} expected mixed, {unsolved:.0%} of prompts at 0/{TRACKED_SAMPLES}.",
    ]
    return "\n".join(rows)


def sanity_gate(records: list[dict]) -> dict:
    """Decided before BAPO is compared: GRPO (trl.GRPOTrainer) must raise held-out mean@8 over the base model by
    at least 0.05, and by more than 3 times the standard deviation of its results across seeds."""
    final = [r["eval_accuracy"] for r in records if r["method"] == "grpo"]
    gain = statistics.median(final) - records[0]["base_eval_accuracy"]
    spread = statistics.stdev(final) if len(final) > 1 else 0.0
    return {"grpo_gain": gain, "grpo_seed_stdev": spread, "passed": gain >= 0.05 and gain > 3 * spread}


def median_curve(records: list[dict], method: str) -> list[list[float]]:
    """[step, completions, held-out mean@8], medians over seeds at each evaluation."""
    curves = [r["heldout_curve"] for r in records if r["method"] == method]
    return [[statistics.median(column) for column in zip(*points)] for points in zip(*curves)]


def completions_to_reach(curve: list[list[float]], accuracy: float) -> float:
    """Completions generated by the first evaluation after training began at or above `accuracy` (inf if never): the
    base model's own point does not count, or an accuracy no higher than the base's would be "reached" at 0."""
    return next((rollouts for step, rollouts, value in curve if step > 0 and value >= accuracy), float("inf"))


def summarize(
    records: list[dict], gate: dict, base: dict, output: Path, seconds: float, rates: dict, regime: Regime
) -> str:
    """Writes the plots and returns RESULTS.md: the gate, medians with min-max per method, and the targets; in the
    paper's regime also each method's gain paired by seed against GRPO's, and the fill X3's supply reaches."""
    methods = [m for m in regime.methods if any(r["method"] == m for r in records)]
    metrics = [
        "eval_accuracy",
        "eval_accuracy_greedy",
        "rollouts",
        "unlock_rate",
        "relock_rate",
        "effective_rollout_ratio",
        "zero_std_fraction",
        "batch_fill_median",
        "seconds_per_step",
        "peak_rss_mib",
    ]
    median = {m: {k: statistics.median(r[k] for r in records if r["method"] == m) for k in metrics} for m in methods}

    def cell(method: str, key: str, digits: int) -> str:
        values = [r[key] for r in records if r["method"] == method]
        return f"{median[method][key]:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    rows = [
        f"| {m} | {rates[m]:.0e} | {cell(m, 'eval_accuracy', 3)} | {cell(m, 'eval_accuracy_greedy', 3)} "
        f"| {cell(m, 'rollouts', 0)} | {cell(m, 'unlock_rate', 3)} | {cell(m, 'relock_rate', 3)} "
        f"| {cell(m, 'effective_rollout_ratio', 2)} | {cell(m, 'zero_std_fraction', 2)} "
        f"| {cell(m, 'batch_fill_median', 2)} | {cell(m, 'seconds_per_step', 3)} | {cell(m, 'peak_rss_mib', 0)} |"
        for m in methods
    ]
    curves = {m: median_curve(records, m) for m in methods}
    plot_curves(curves, output / "heldout.png")
    # The composition and bins of BAPO's first run, or of the first BAPO variant's when BAPO itself did not run.
    drawn = next((m for m in ["bapo", *methods] if m.startswith("bapo") and m in methods), None)
    figures = []
    if drawn:
        first = _first(records, drawn)
        # `composition` holds one entry per rollout step: BAPO logs its metrics once per rollout step.
        plot_composition(first["composition"], regime.prompts_per_rollout, output / "composition.png")
        plot_accuracy_bins(
            accuracy_bins(base["tracked"], GROUP_SIZE), first["tracked_bins"], output / "accuracy_bins.png"
        )
        figures = [
            "![composition](composition.png) ![bins](accuracy_bins.png)",
            "",
            f"Composition and accuracy bins: the {drawn} run of seed {first['seed']}.",
            "",
        ]
    base_accuracy = records[0]["base_eval_accuracy"]
    if regime.name == "paper" and "grpo" in median:
        comparison = paper_sections(records, median, curves, base_accuracy, gate)
    elif {"grpo", "dapo", "bapo"} <= set(methods):
        comparison = ["## Targets (same run, medians)", "", *_targets(median, curves, base_accuracy)]
    else:
        comparison = ["Not all of GRPO, DAPO, BAPO ran."]
    seeds = sorted({r["seed"] for r in records})
    return "\n".join(
        [
            f"# Benchmark: GRPO vs DAPO vs BAPO, {regime.name} regime",
            "",
            f"Task `{regime.task}` (warm start {regime.warm_start_steps} steps), {records[0]['steps']} optimizer "
            f"steps per run, {regime.updates_per_rollout} per rollout batch, seeds {seeds}, G = {GROUP_SIZE}, "
            f"{regime.prompts_per_rollout} prompts per rollout batch. Medians over seeds, (min-max).",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, {platform.platform()}; "
            f"commit {_commit()}; whole run {seconds / 60:.1f} min. Written findings: [FINDINGS.md](FINDINGS.md).",
            f"Model: {_kernel_line(records[0])}.",
            "",
            "## Sanity gate (decided before BAPO is compared)",
            "",
            _gate_line(gate, records[0]["base_eval_accuracy"]),
            "",
            "## Results",
            "",
            "| method | lr | held-out mean@8 | held-out greedy | completions | unlock rate | relock rate | effective "
            "rollouts | zero-std share | batch fill | s / step | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Effective rollouts: completions trained on with a non-zero advantage (each training use counts), over "
            "completions generated. Unlock/relock: tracked training prompts at 0/32 before that reach >= 1/32 "
            "after, and solved ones that fall to 0/32. Batch fill: `bapo/batch_fill`, median over the run.",
            "",
            *comparison,
            "",
            "![held-out accuracy](heldout.png)",
            "",
            *figures,
        ]
    )


def paired_difference(records: list[dict], method: str, reference: str = "grpo") -> dict:
    """`method`'s final held-out accuracy minus `reference`'s, seed by seed (the same warm start and evaluation
    sampling, so this is the difference of their gains): the mean and its 90% interval."""
    by_seed = {r["seed"]: r["eval_accuracy"] for r in records if r["method"] == reference}
    differences = [
        r["eval_accuracy"] - by_seed[r["seed"]] for r in records if r["method"] == method and r["seed"] in by_seed
    ]
    return mean_interval(differences)


def mean_interval(differences: list[float]) -> dict:
    """The mean of paired differences and its two-sided 90% Student's t interval (unbounded with one pair)."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return {"mean": mean, "low": -math.inf, "high": math.inf, "seeds": len(differences)}
    # Student's t at 0.95: a two-sided 90% interval.
    half = scipy.stats.t.ppf(0.95, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": len(differences), "half_width": half}


def verdict(difference: dict) -> str:
    """A win or a loss only where the interval excludes zero."""
    if difference["low"] > 0:
        return "win"
    return "loss" if difference["high"] < 0 else "tie"


def paper_sections(records: list[dict], median: dict, curves: dict, base: float, gate: dict) -> list[str]:
    """The paper regime's comparison: gains paired by seed against GRPO's, the resolution they reach, the fill of
    the X3 supply settings, and the issue's targets for BAPO's best variant."""
    grpo_gain = statistics.fmean(r["eval_accuracy"] for r in records if r["method"] == "grpo") - base
    compared = [m for m in median if m != "grpo" and m not in SUPPLY_METHODS]
    differences = {m: paired_difference(records, m) for m in compared}
    lines = [
        "## Gains paired by seed against GRPO",
        "",
        f"GRPO's mean gain over the base model: {grpo_gain:+.3f}. Per method: the mean over seeds of its final "
        "held-out mean@8 minus GRPO's on the same seed, with a 90% t-interval; the interval's half-width against "
        "0.3 x GRPO's gain (the resolution the comparison needs); a win or loss only where the interval excludes 0.",
        "",
        "| method | seeds | gain - GRPO's | 90% interval | half-width / (0.3 x GRPO gain) | verdict | gain ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, d in differences.items():
        # Against a GRPO that did not gain, neither the resolution nor the ratio of gains has a meaning.
        resolution = f"{d.get('half_width', math.inf) / (0.3 * grpo_gain):.2f}" if grpo_gain > 0 else "n/a"
        ratio = f"{(grpo_gain + d['mean']) / grpo_gain:.2f}" if grpo_gain > 0 else "n/a"
        lines.append(
            f"| {method} | {d['seeds']} | {d['mean']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] | {resolution} "
            f"| {verdict(d)} | {ratio} |"
        )
    seeds = sorted({r["seed"] for r in records})
    hours = sum(r["wall_seconds"] for r in records) / 3600
    supply = [m for m in SUPPLY_METHODS + ("bapo",) if m in median]
    lines += [
        "",
        f"What this resolution cost: {len(seeds)} seeds x {len(compared) + 1} methods, plus the X3 supply settings "
        f"on the first seed, {len(records)} runs, {hours:.1f} hours of training on this machine (one core per run, "
        f"held-out evaluations included), each evaluated on 200 held-out prompts x 8 samples.",
    ]
    if supply:
        lines += [
            "",
            "## The supply of X3 (first seed)",
            "",
            "| setting | batch fill (median) | X3 groups per rollout (mean) |",
            "|---|---|---|",
            *[
                f"| {m} | {_first(records, m)['batch_fill_median']:.2f} "
                f"| {_first(records, m).get('bapo_means', {}).get('bapo/x3', math.nan):.1f} |"
                for m in supply
            ],
        ]
    variants = [m for m in ("bapo", "bapo_decoupled", "bapo_authors") if m in differences]
    if not variants or "dapo" not in median:
        return lines
    best = max(variants, key=lambda m: differences[m]["mean"])
    chosen, grpo, dapo = median[best], median["grpo"], median["dapo"]
    needed = completions_to_reach(curves[best], dapo["eval_accuracy"])
    d = differences[best]
    checks = [
        (f"batch fill (median) >= 0.7: {chosen['batch_fill_median']:.2f}", chosen["batch_fill_median"] >= 0.7),
        (
            f"gain >= 1.3 x GRPO's: paired difference {d['mean']:+.4f} >= {0.3 * grpo_gain:.4f} with its interval "
            f"above 0 ([{d['low']:+.4f}, {d['high']:+.4f}])",
            d["mean"] >= 0.3 * grpo_gain and d["low"] > 0,
        ),
        (
            f"DAPO's accuracy at <= 0.5 x DAPO's completions: {needed:.0f} of {dapo['rollouts']:.0f}",
            needed <= 0.5 * dapo["rollouts"],
        ),
        (
            f"unlock rate >= 1.5 x GRPO's: {chosen['unlock_rate']:.3f} vs {grpo['unlock_rate']:.3f}, relock "
            f"{chosen['relock_rate']:.3f} below unlock",
            chosen["unlock_rate"] >= 1.5 * grpo["unlock_rate"] and chosen["relock_rate"] < chosen["unlock_rate"],
        ),
        (
            f"s/step <= 1.15 x GRPO's: {chosen['seconds_per_step'] / grpo['seconds_per_step']:.2f} x",
            chosen["seconds_per_step"] <= 1.15 * grpo["seconds_per_step"],
        ),
    ]
    return lines + [
        "",
        f"## Targets for BAPO's best variant here, `{best}` (medians; the gain paired by seed)",
        "",
        *[f"- {text} -> {'met' if met else 'MISSED'}" for text, met in checks],
    ]


def _kernel_line(record: dict) -> str:
    path = record.get("kernel_path", {})
    settings = ", ".join(f"{k}={path[k]}" for k in KERNEL_SETTINGS if k in path)
    return (
        f"warm start `{record['task']}` {record['warm_start_steps']} steps, base held-out mean@8 "
        f"{record['base_eval_accuracy']:.3f}; trained on kernel path {path.get('cpu_capability', '?')} "
        f"({settings or 'default settings'}), {path.get('torch_threads', '?')} threads per run, CPU flags "
        f"{', '.join(path.get('cpu_flags', [])) or '?'}"
    )


def _first(records: list[dict], method: str) -> dict:
    return min((r for r in records if r["method"] == method), key=lambda r: r["seed"])


def _gate_line(gate: dict, base: float) -> str:
    if not gate:
        return "Not decided: GRPO was not among the methods run."
    return (
        f"GRPO raises held-out mean@8 from {base:.3f} (base model) by {gate['grpo_gain']:+.3f} (median over seeds); "
        f"the standard deviation across seeds is {gate['grpo_seed_stdev']:.3f}. Gate (gain >= 0.05 and > 3 x that "
        f"deviation): {'passed' if gate['passed'] else 'FAILED'}."
    )


def _targets(median: dict, curves: dict, base: float) -> list[str]:
    bapo, grpo, dapo = median["bapo"], median["grpo"], median["dapo"]

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("inf")

    needed = completions_to_reach(curves["bapo"], dapo["eval_accuracy"])
    checks = [
        (
            "BAPO's held-out gain >= 1.3 x GRPO's",
            ratio(bapo["eval_accuracy"] - base, grpo["eval_accuracy"] - base),
            1.3,
            True,
        ),
        (
            "completions BAPO needs to reach DAPO's final accuracy <= 0.5 x DAPO's",
            ratio(needed, dapo["rollouts"]),
            0.5,
            False,
        ),
        ("BAPO unlock rate >= 1.5 x GRPO's", ratio(bapo["unlock_rate"], grpo["unlock_rate"]), 1.5, True),
        ("BAPO relock rate below its unlock rate", ratio(bapo["relock_rate"], bapo["unlock_rate"]), 1.0, False),
        ("BAPO s/step <= 1.15 x GRPO's", ratio(bapo["seconds_per_step"], grpo["seconds_per_step"]), 1.15, False),
    ]
    lines = [
        f"- {name}: ratio {value:.2f} -> {'met' if (value >= bound if at_least else value < bound) else 'MISSED'}"
        for name, value, bound, at_least in checks
    ]
    return lines + [f"- BAPO peak RSS / GRPO's: {ratio(bapo['peak_rss_mib'], grpo['peak_rss_mib']):.2f} (no target)"]


def _commit() -> str:
    """The commit the code ran at, with "-dirty" where the tree had changes not committed."""
    try:
        command = ["git", "describe", "--always", "--dirty", "--abbrev=7"]
        return subprocess.run(command, capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def sweep(regime: Regime, options, output: Path, base: dict) -> dict:
    """Each swept method at every rate (first seed), then, in the carry regime, the off-policy losses at BAPO's
    best rate; writes sweep.json (best rate per method, best loss option, every run) and SWEEP.md."""
    runs, steps, seed = [], options.steps or regime.steps, (options.seeds or [0])[0]
    for method in SWEPT_METHODS:
        for rate in SWEEP_RATES:
            runs.append(run_in_fresh_process(method, seed, steps, regime, output / "runs", rate, base))
            _print(runs[-1])
    best = {m: max((r for r in runs if r["method"] == m), key=lambda r: r["eval_accuracy"]) for m in SWEPT_METHODS}
    rates = {m: best[m]["learning_rate"] for m in SWEPT_METHODS}
    losses = [m for m in LOSS_OPTIONS if m in regime.methods]
    for method in losses:
        runs.append(run_in_fresh_process(method, seed, steps, regime, output / "runs", rates["bapo"], base))
        _print(runs[-1])
    loss_runs = [r for r in runs if r["method"] in losses]
    best_loss = max(loss_runs, key=lambda r: r["eval_accuracy"])["method"] if loss_runs else None
    result = {
        "rates": rates,
        "best_loss": best_loss,
        "commit": _commit(),
        "model": model_record(regime),
        "runs": runs,
    }
    (output / "sweep.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Learning-rate sweep, {regime.name} regime",
        "",
        f"Seed {seed}, {steps} steps, task `{regime.task}`; held-out mean@8 after training "
        f"(base {base['heldout']:.3f}). Each method's best rate is used by `make bench`; BAPO's variants use BAPO's"
        + (". The off-policy REINFORCE losses ran at BAPO's best rate." if losses else "."),
        "",
        "| method | lr | held-out mean@8 | completions | s / step |",
        "|---|---|---|---|---|",
        *[
            f"| {r['method']} | {r['learning_rate']:.0e} | {r['eval_accuracy']:.3f} | {r['rollouts']:.0f} "
            f"| {r['seconds_per_step']:.3f} |"
            for r in runs
        ],
        "",
        f"Best rates: {', '.join(f'{m} {rate:.0e}' for m, rate in rates.items())}"
        + (f"; best loss option: {best_loss}." if best_loss else "."),
        "",
    ]
    (output / "SWEEP.md").write_text("\n".join(lines))
    return result


def zero_variance_share(tracked: list[float]) -> float:
    """The expected share of groups of G whose rewards are all equal (all wrong or all right), from each tracked
    prompt's accuracy p: p^G + (1 - p)^G."""
    return statistics.fmean(p**GROUP_SIZE + (1 - p) ** GROUP_SIZE for p in tracked)


def choose_task(regime: Regime, options, output: Path, seeds: list[int], steps: int, rate: float):
    """The rule of PAPER_CANDIDATES, decided by GRPO alone before any BAPO variant runs: the first candidate whose
    training groups start at least ZERO_VARIANCE_SHARE at zero reward variance, and on which GRPO's runs on the
    bench's own seeds pass the gate. Writes the figures to DIFFICULTY.md; returns the regime on that task, its base
    accuracies and GRPO's records (which the comparison reuses), or None where no candidate meets the rule."""
    figures = []
    for task, warm_start_steps in regime.candidates:
        candidate = dataclasses.replace(regime, task=task, warm_start_steps=warm_start_steps)
        base = base_accuracies(candidate, options.tracked_prompts)
        figure = {"task": task, "warm_start_steps": warm_start_steps, "base": base["heldout"]}
        figure["zero_variance_share"] = zero_variance_share(base["tracked"])
        figures.append(figure)
        print(figure, flush=True)
        if figure["zero_variance_share"] < ZERO_VARIANCE_SHARE:
            continue
        records = []
        for seed in seeds:
            records.append(run_in_fresh_process("grpo", seed, steps, candidate, output / "runs", rate, base))
            _print(records[-1])
        figure["gate"] = sanity_gate(records)
        if figure["gate"]["passed"]:
            break
    (output / "DIFFICULTY.md").write_text(difficulty_rule(figures, seeds, steps, rate, regime))
    return (candidate, base, records) if figure.get("gate", {}).get("passed") else None


def difficulty_rule(figures: list[dict], seeds: list[int], steps: int, rate: float, regime: Regime) -> str:
    lines = [
        f"# The {regime.name} regime's task",
        "",
        f"Rule, fixed before any BAPO variant ran here: the first candidate whose training groups start at least "
        f"{ZERO_VARIANCE_SHARE:.0%} at zero reward variance (all {GROUP_SIZE} completions wrong or all right, "
        f"expected from each tracked training prompt's accuracy over {TRACKED_SAMPLES} samples), and on which GRPO "
        f"(trl.GRPOTrainer, {steps} optimizer steps, {regime.updates_per_rollout} per rollout batch of "
        f"{regime.prompts_per_rollout} prompts, seeds {seeds}, lr {rate:.0e}) passes the gate: held-out gain >= "
        "0.05 and > 3 x its standard deviation over seeds. GRPO's runs here are the comparison's.",
        "",
        "| task | warm start | base mean@8 | zero-variance share | GRPO gain | seed stdev | gate |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {f['task']} | {f['warm_start_steps']} | {f['base']:.3f} | {f['zero_variance_share']:.2f} | "
            + (
                f"{f['gate']['grpo_gain']:+.3f} | {f['gate']['grpo_seed_stdev']:.3f} | "
                f"{'passed' if f['gate']['passed'] else 'failed'} |"
                if "gate" in f
                else "not run (share below the rule) | | |"
            )
            for f in figures
        ],
        "",
    ]
    return "\n".join(lines)


def _print(record: dict) -> None:
    print(
        f"{record['method']:>13} seed {record['seed']} lr {record['learning_rate']:.0e}: held-out "
        f"{record['base_eval_accuracy']:.3f} -> {record['eval_accuracy']:.3f} "
        f"greedy {record['eval_accuracy_greedy']:.3f} "
        f"completions {record['rollouts']:.0f} unlock {record['unlock_rate']:.3f} relock {record['relock_rate']:.3f} "
        f"effective {record['effective_rollout_ratio']:.2f} {record['wall_seconds']:.0f}s "
        f"peak RSS {record['peak_rss_mib']:.0f} MiB",
        flush=True,
    )


def load_sweep(output: Path) -> dict:
    """The regime's own sweep, else the carry regime's one folder up: the paper regime has no sweep of its own,
    since it trains the same tiny model with the same optimizer settings (its rates are the carry sweep's)."""
    for folder in (output, output.parent):
        if (folder / "sweep.json").exists():
            return json.loads((folder / "sweep.json").read_text())
    return {}


def run_regime(regime: Regime, options, output: Path) -> dict:
    """One regime's comparison (or its sweep), written under `output`."""
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if options.sweep:
        return sweep(regime, options, output, base_accuracies(regime, options.tracked_prompts))
    steps = options.steps or regime.steps
    swept = load_sweep(output)
    best_loss = swept.get("best_loss") or "bapo_rec"
    methods = options.methods or [
        m for m in regime.methods if (m not in LOSS_OPTIONS or m == best_loss) and m not in TIMING_METHODS
    ]
    methods = [m for m in methods if m in regime.methods]
    bapo_rate = swept.get("rates", {}).get("bapo", TRAINING["learning_rate"])
    rates = {
        m: swept.get("rates", {}).get(m, bapo_rate if m.startswith("bapo") else TRAINING["learning_rate"])
        for m in methods
    }
    seeds = options.seeds or (PAPER_SEEDS if regime.name == "paper" else [0, 1, 2])
    records = []
    # The rule is decided by GRPO's runs; without GRPO among the methods the regime keeps its first candidate.
    if regime.candidates and "grpo" in methods:
        grpo_rate = swept.get("rates", {}).get("grpo", TRAINING["learning_rate"])
        picked = choose_task(regime, options, output, seeds, steps, grpo_rate)
        if picked is None:  # no method is compared where GRPO cannot pass the gate
            report = f"# The {regime.name} regime\n\nNo candidate task met the rule: see DIFFICULTY.md.\n"
            (output / "RESULTS.md").write_text(report)
            print(report)
            return {"gate": {}, "records": []}
        regime, base, records = picked
    else:
        base = base_accuracies(regime, options.tracked_prompts)
    if options.learning_rate:
        rates = dict.fromkeys(methods, options.learning_rate)
    if regime.name == "carry":
        (output / "DIFFICULTY.md").write_text(difficulty_table(regime.task, base) + "\n")
    chosen = {(r["method"], r["seed"]) for r in records}
    # Methods interleave within each seed so that machine load drifts hit every method alike; the X3 supply
    # settings run on the first seed only, for their batch fill.
    for seed in seeds:
        for method in methods:
            if (method in SUPPLY_METHODS and seed != seeds[0]) or (method, seed) in chosen:
                continue
            records.append(run_in_fresh_process(method, seed, steps, regime, output / "runs", rates[method], base))
            _print(records[-1])
    gate = sanity_gate(records) if any(r["method"] == "grpo" for r in records) else {}
    result = write_results(output, gate, base, regime, records)
    report = summarize(records, gate, base, output, time.perf_counter() - started, rates, regime)
    (output / "RESULTS.md").write_text(report)
    print(report)
    return result


def merge_results(regime: Regime, runs: list[Path], output: Path) -> dict:
    """One regime's report from the results.json of several partial runs (its methods or seeds split between
    processes, each on its own core): the same runs `make bench` makes in one process, summarized together."""
    records = [r for folder in runs for r in json.loads((folder / "results.json").read_text())["records"]]
    (task, warm_start_steps), *others = {(r["task"], r["warm_start_steps"]) for r in records}
    if others:
        raise ValueError(f"The runs to merge trained on different tasks: {[(task, warm_start_steps), *others]}.")
    regime = dataclasses.replace(regime, task=task, warm_start_steps=warm_start_steps)
    base = base_accuracies(regime, TRACKED_PROMPTS)
    rates = {r["method"]: r["learning_rate"] for r in records}
    gate = sanity_gate(records)
    output.mkdir(parents=True, exist_ok=True)
    result = write_results(output, gate, base, regime, records)
    seconds = sum(r["wall_seconds"] for r in records)
    (output / "RESULTS.md").write_text(summarize(records, gate, base, output, seconds, rates, regime))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", nargs="+", choices=["carry", "paper"], default=["carry", "paper"])
    parser.add_argument("--methods", nargs="+", help="default: every method of the regime, with the sweep's loss")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 (carry), PAPER_SEEDS (paper)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run; default: the regime's")
    parser.add_argument("--output-dir", default="bench")
    parser.add_argument("--tracked-prompts", type=int, default=TRACKED_PROMPTS, help="training prompts for unlock")
    parser.add_argument("--sweep", action="store_true", help="run the learning-rate sweep instead")
    parser.add_argument(
        "--task",
        help="TASK:WARM_START_STEPS, e.g. arithmetic:1500: train the first regime on this task, outside its rule",
    )
    parser.add_argument("--learning-rate", type=float, help="one rate for every method, instead of the sweep's")
    parser.add_argument(
        "--merge", nargs="+", type=Path, help="summarize the first regime from these folders' results.json instead"
    )
    options = parser.parse_args(argv)
    if options.sweep and options.regimes[0] != "carry":
        parser.error("--sweep runs in the carry regime: the paper regime trains with its rates (load_sweep)")
    quiet_libraries()
    output = Path(options.output_dir)
    regimes = dict(REGIMES)
    if options.task:
        task, warm_start_steps = options.task.split(":")
        name = options.regimes[0]
        regimes[name] = dataclasses.replace(
            regimes[name], task=task, warm_start_steps=int(warm_start_steps), candidates=()
        )
    if options.merge:
        regime = regimes[options.regimes[0]]
        return merge_results(regime, options.merge, output / regime.folder)
    # One sweep, in the carry regime: the paper regime trains the same model with the same optimizer (load_sweep).
    names = options.regimes[:1] if options.sweep else options.regimes
    results = {name: run_regime(regimes[name], options, output / regimes[name].folder) for name in names}
    return results[names[0]] if len(results) == 1 else results


if __name__ == "__main__":
    main()
