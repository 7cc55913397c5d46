"""`make bench-costs`: what BAPO costs beside GRPO in memory, disk and time, measured on two models.

    python -m trl_bapo.examples.cost_bench             # both models, writes bench/costs.json
    python -m trl_bapo.examples.cost_bench --render    # rewrites bench/COSTS.md and the table in
                                                       # docs/from-grpo.md from bench/costs.json, trains nothing

Each model (the embedded default, about 1M parameters; SmolLM2-135M-Instruct, built offline from its wheel) trains
a few optimizer steps with `trl.GRPOTrainer` and with `BAPOTrainer`, the same GRPO settings for both (beta 0.001 as
the paper's Table 3, so GRPO builds its frozen reference model and BAPO, whose KL is taken against the behavior
policy, does not), each in a fresh process so that its peak resident memory is its own. One checkpoint is saved at
the last step. Recorded per run: peak RSS, the bytes alpha holds in host memory, the checkpoint's size on disk and
the part of it that is BAPO's state file, and seconds per optimizer step from step 2 on (the steps cover a refresh
of alpha, a stale step and a re-evaluation of B_bad; the checkpoint's save comes after the last step is timed). The
results file names the commit, the CPU's flags, torch's kernel path, the thread count and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from trl_bapo import BAPOConfig, BAPOTrainer
from trl_bapo.builtin.embedded import TRAINING, embedded_datasets, embedded_model, kernel_path
from trl_bapo.builtin.smollm2 import smollm2_model
from trl_bapo.builtin.tasks import WORD_PROBLEMS, arithmetic_reward, task_splits, word_problem_reward
from trl_bapo.examples.callbacks import StepClock, quiet_libraries

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "bench" / "costs.json"
REPORT = ROOT / "bench" / "COSTS.md"
PAGE = ROOT / "docs" / "from-grpo.md"
BEGIN, END = "<!-- costs:begin -->", "<!-- costs:end -->"
TIMED_FROM = 2  # the first step pays for one-time setup (kernels' warm-up, alpha's first copy)
MODELS = ("embedded", "smollm2")
TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "bapo": (BAPOConfig, BAPOTrainer)}
# The embedded default as `make demo` trains it (16 prompts x 8 completions, 8 tokens), 6 steps at BAPOConfig's
# v = m = 5 (step 5 refreshes alpha and re-evaluates). SmolLM2 with 8 prompts x 4 completions of 8 tokens, 3 steps at
# v = m = 2 (step 2 refreshes and re-evaluates, step 3 is stale): a step of a 135M model takes minutes on 2 shared CPU
# cores. Both have B >= 8 prompts per rollout batch.
SETTINGS = {
    "embedded": dict(TRAINING, max_steps=6),
    "smollm2": dict(
        TRAINING,
        num_generations=4,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        max_completion_length=8,
        learning_rate=1e-5,
        max_steps=3,
    ),
}
BAPO_SETTINGS = {"embedded": {}, "smollm2": dict(rollout_delay=2, reevaluation_interval=2)}


def model_and_data(model: str) -> tuple[str, Any, Any]:
    """The model's path, its train prompts and its reward."""
    if model == "embedded":
        return str(embedded_model()), embedded_datasets("carry")[0], arithmetic_reward
    train, _ = task_splits(WORD_PROBLEMS, train_size=256, heldout_size=0, seed=0, max_digits=1)
    return str(smollm2_model()), train, word_problem_reward


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def measure(model: str, trainer: str, threads: int) -> dict[str, Any]:
    """Trains `trainer` on `model` for its few steps in this process and returns what it cost."""
    quiet_libraries()
    torch.set_num_threads(threads)
    path, train, reward = model_and_data(model)
    config_class, trainer_class = TRAINERS[trainer]
    with tempfile.TemporaryDirectory() as output_dir:
        steps = SETTINGS[model]["max_steps"]
        settings = {**SETTINGS[model], "seed": 0, "save_strategy": "steps", "save_steps": steps}
        if trainer == "bapo":
            settings.update(BAPO_SETTINGS[model])
        args = config_class(output_dir=output_dir, **settings)
        load_before = os.getloadavg()[0]
        clock = StepClock()
        built = trainer_class(model=path, reward_funcs=reward, args=args, train_dataset=train, callbacks=[clock])
        built.remove_callback(PrinterCallback)  # one line per run is printed instead
        built.train()
        checkpoint = Path(output_dir) / f"checkpoint-{steps}"
        state_file = checkpoint / "bapo_state_0.pt"
        snapshot = built._bapo.snapshot.weights if trainer == "bapo" else {}
        trainable = [p for p in built.model.parameters() if p.requires_grad]
        logged = [entry for entry in built.state.log_history if "bapo/rollouts" in entry]
        return {
            "model": model,
            "trainer": trainer,
            "parameters": sum(p.numel() for p in built.model.parameters()),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "prompts_per_rollout": args.generation_batch_size // args.num_generations,
            "num_generations": args.num_generations,
            "max_completion_length": args.max_completion_length,
            "steps": steps,
            "v_m": [args.rollout_delay, args.reevaluation_interval] if trainer == "bapo" else None,
            "reference_model": built.ref_model is not None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "alpha_host_bytes": sum(t.numel() * t.element_size() for t in snapshot.values()),
            "checkpoint_bytes": folder_bytes(checkpoint),
            "bapo_state_bytes": state_file.stat().st_size if state_file.exists() else 0,
            "step_seconds": clock.seconds,
            "seconds_per_step": statistics.fmean(clock.seconds[TIMED_FROM - 1 :]),
            "completions": logged[-1]["bapo/rollouts"] if logged else steps * args.generation_batch_size,
            # Other processes on the machine slow the steps down: the 1-minute load average before and after.
            "load_average": [load_before, os.getloadavg()[0]],
        }


def in_fresh_process(*args: Any) -> dict[str, Any]:
    """`measure` in a new process, so that its peak memory is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def commit() -> dict[str, Any]:
    """The commit measured, and whether the tree had changes beside it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    status = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True, cwd=ROOT)
    return {"commit": head.stdout.strip() or "unknown", "uncommitted_changes_in_src": bool(status.stdout.strip())}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def mib(count: float) -> str:
    return f"{count / 2**20:,.1f}"


def cost_table(results: dict[str, Any]) -> str:
    """The markdown table of `results` (bench/costs.json) with the line that says where it ran."""
    machine = results["machine"]
    lines = [
        "| model | trainer | peak RSS (MiB) | alpha in host memory (MiB) | checkpoint on disk (MiB) | of it BAPO's "
        f"state (MiB) | s / step (from step {TIMED_FROM}) | completions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        model = (
            f"{run['model']} ({run['parameters'] / 1e6:.1f}M parameters; B = {run['prompts_per_rollout']}, "
            f"G = {run['num_generations']}, {run['max_completion_length']} tokens)"
        )
        trainer = run["trainer"] + (" (+ reference model)" if run["reference_model"] else "")
        if run["v_m"]:
            trainer += f" (v = {run['v_m'][0]}, m = {run['v_m'][1]})"
        model += f", {run['steps']} steps"
        lines.append(
            f"| {model} | {trainer} | {run['peak_rss_mib']:,.0f} | {mib(run['alpha_host_bytes'])} | "
            f"{mib(run['checkpoint_bytes'])} | {mib(run['bapo_state_bytes'])} | {run['seconds_per_step']:.3f} | "
            f"{run['completions']:,.0f} |"
        )
    changes = " (with uncommitted changes in src/)" if results["uncommitted_changes_in_src"] else ""
    loads = [load for run in results["runs"] for load in run["load_average"]]
    lines += [
        "",
        f"From bench/costs.json: `make bench-costs` at commit {results['commit']}{changes}, one checkpoint at "
        f"the last step of each run; {machine['cpu']} (flags "
        f"{', '.join(machine['cpu_flags'])}), torch {machine['torch']} on its {machine['cpu_capability']} kernel "
        f"path, {machine['torch_threads']} torch thread(s), float32; the machine's 1-minute load average lay between "
        f"{min(loads):.1f} and {max(loads):.1f} on its {machine['cores']} cores during the runs.",
    ]
    return "\n".join(lines)


def replace_between_markers(text: str, table: str) -> str:
    pattern = re.compile(f"{re.escape(BEGIN)}.*?{re.escape(END)}", re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN} ... {END} markers to write the table between")
    return pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text)


def render(results: dict[str, Any]) -> None:
    """bench/COSTS.md, and the table in docs/from-grpo.md, from `results`."""
    table = cost_table(results)
    REPORT.write_text(
        "# What BAPO costs beside GRPO\n\n"
        "Written by `make bench-costs` (`python -m trl_bapo.examples.cost_bench`) from bench/costs.json; "
        "docs/from-grpo.md gives the formulas behind each column.\n\n"
        f"{table}\n\n"
        "Per-step seconds of every run are in bench/costs.json (`step_seconds`). Each run trains in a fresh "
        "process; peak RSS includes loading the model and the dataset. The timings are a few steps on a shared CPU: "
        "read them as a ratio between the two trainers of one model, not as a throughput.\n"
    )
    PAGE.write_text(replace_between_markers(PAGE.read_text(), table))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    # One thread, as `make bench` runs: on cores other work shares, torch's threads wait on each other for whole
    # time slices, and a step of the embedded default grew from under a second to tens of seconds at 2 threads.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", action="store_true", help="rewrite the reports from bench/costs.json only")
    options = parser.parse_args(argv)
    if options.render:
        results = json.loads(RESULTS.read_text())
        render(results)
        return results
    torch.set_num_threads(options.threads)
    runs = []
    for model in options.models:
        for trainer in TRAINERS:
            runs.append(in_fresh_process(model, trainer, options.threads))
            print(json.dumps({key: value for key, value in runs[-1].items() if key != "step_seconds"}), flush=True)
    results = {
        **commit(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), **kernel_path()},
        "runs": runs,
    }
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    render(results)
    return results


if __name__ == "__main__":
    main()
