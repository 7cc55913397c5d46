"""`make bench-overlap`: seconds per step with and without `overlap_rollout`, in one run, with the same seed.

    python -m trl_bapo.examples.overlap_bench --engine hf              # transformers' generate (main environment)
    python -m trl_bapo.examples.overlap_bench --engine server          # a vLLM CPU server (.venv-vllm)
    python -m trl_bapo.examples.overlap_bench --engine server --lora   # the same, training a LoRA adapter
    python -m trl_bapo.examples.overlap_bench --target-server          # time to GRPO's accuracy, server + LoRA

All train BAPO (per-step sampling seeds, rollout_delay v = 5) on the embedded default. `hf` generates with
transformers' generate in the trainer's process, both threads on both cores. `server` starts a vLLM server pinned to
core 0 and trains pinned to core 1 (one thread each). With full weights the server keeps the weights it loaded, since
TRL sends weights to it over NCCL, which needs CUDA: the transfer is a STAND-IN that sends nothing (the timing leaves
it out). With `--lora` nothing stands in: alpha's adapter goes to the server by file at each refresh
(`trl_bapo.lora_sync`), inside the step that needs it, and the bench times each load.

Each setting runs twice, in the order sync, overlap, overlap, sync, and its per-step times are averaged over the two.
For each engine the bench writes the synchronous and the overlapped run's seconds per step, their ratio, and the
bound: a prefetch can hide at most min(generation of step t+1, training of step t), so the best overlapped time is
the synchronous time less that sum over the steps that were prefetched. Results go to bench/overlap-ENGINE.json and
the table in bench/OVERLAP.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import PrinterCallback

from trl_bapo import BAPOConfig, BAPOTrainer
from trl_bapo.builtin.embedded import (
    GROUP_SIZE,
    PROMPTS_PER_STEP,
    TRAINING,
    embedded_datasets,
    embedded_model,
    kernel_path,
)
from trl_bapo.builtin.rewards import load_reward
from trl_bapo.builtin.tasks import CARRY
from trl_bapo.builtin.tiny import build_tiny_model
from trl_bapo.examples.benchmark import (
    METHODS,
    OFF,
    REGIMES,
    Regime,
    _commit,
    base_accuracies,
    run_in_fresh_process,
    sanity_gate,
    write_results,
)
from trl_bapo.examples.callbacks import StepClock, quiet_libraries

# --target-server's methods: GRPO as BAPOTrainer with the features off; BAPO with per-step seeds, synchronous and
# overlapped (METHODS["bapo_overlap"]).
SERVER_METHODS = {
    "grpo": OFF,
    "bapo": dict(rollout_sampling_seed="per_step"),
    "bapo_overlap": METHODS["bapo_overlap"],
}
WARMUP_STEPS = 2  # left out of the means: the first steps pay for one-time setup (the replica, kernels' warm-up)


# The adapter the LoRA rows train: every linear layer of the embedded default, rank 8.
LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting of --target-server: the adapter's rank (lora_alpha = 2 r), the learning rate, and the prompts
    per rollout batch (the carry regime's 16, or more through a larger per-device batch)."""

    rank: int
    learning_rate: float
    prompts: int = PROMPTS_PER_STEP

    def __post_init__(self):
        # The name is the candidate's folder, where its runs are reused from: it must name one rate only.
        if float(f"{self.learning_rate:.0e}") != self.learning_rate:
            raise ValueError(f"A candidate's learning rate has one significant digit; got {self.learning_rate}.")

    @property
    def name(self) -> str:
        wider = f"-p{self.prompts}" if self.prompts != PROMPTS_PER_STEP else ""
        return f"r{self.rank}-lr{self.learning_rate:.0e}{wider}"

    @property
    def lora(self) -> dict:
        return {**LORA, "r": self.rank, "lora_alpha": 2 * self.rank}

    def regime(self, regime: Regime) -> Regime:
        accumulation = regime.training["gradient_accumulation_steps"]
        batch = GROUP_SIZE * self.prompts // accumulation
        return dataclasses.replace(regime, training={**regime.training, "per_device_train_batch_size": batch})


# The rule that picks --target-server's setting, fixed before BAPO ran on any of them: the first candidate, in this
# order, on which GRPO alone passes the benchmark's gate; BAPO then runs on that one only. LoRA trains few weights,
# at a higher rate than the full model's 5e-4; a rank of 32 of the hidden 128 gives the adapter room that rank 8 may
# lack, and the lower rate follows in case the higher rank makes 2e-3 too fast. The fourth was added after the first
# three failed, from GRPO-only runs with transformers' generate (3 seeds each: lr 3e-3 gained +0.039, 32 prompts a
# rollout batch +0.056, the carry task's 700-step warm start +0.017): twice the prompts halve the gradient's variance.
SERVER_CANDIDATES = (Candidate(8, 2e-3), Candidate(32, 2e-3), Candidate(32, 1e-3), Candidate(8, 2e-3, prompts=32))


class AdapterClock:
    """Wall seconds and bytes of each adapter load into the server (write, load, unload of the one replaced)."""

    def __init__(self, trainer):
        self.loads: list[dict] = []
        adapters = trainer._engine.adapters
        load = adapters.load

        def timed_load(kind, name, model):
            began = time.perf_counter()
            load(kind, name, model)
            folder = Path(adapters.folder) / name
            size = sum(path.stat().st_size for path in folder.iterdir())
            self.loads.append(
                {
                    "kind": kind,
                    "step": trainer.state.global_step,
                    "seconds": time.perf_counter() - began,
                    "bytes": size,
                }
            )

        adapters.load = timed_load


def run(
    overlap: bool,
    engine: str,
    steps: int,
    output: Path,
    server_url: str | None,
    completion_length: int,
    model: Path,
    lora: bool = False,
) -> dict:
    model_path = model
    train, _ = embedded_datasets()
    engine_settings = (
        dict(use_vllm=True, vllm_mode="server", vllm_server_base_url=server_url) if engine == "server" else {}
    )
    args = BAPOConfig(
        **{**TRAINING, "max_completion_length": completion_length},
        **engine_settings,
        output_dir=str(output / f"{engine}{'-lora' if lora else ''}-{'overlap' if overlap else 'sync'}"),
        max_steps=steps,
        seed=0,
        rollout_sampling_seed="per_step",
        overlap_rollout=overlap,
    )
    trainer = BAPOTrainer(
        model=str(model_path),
        reward_funcs=load_reward(CARRY),
        args=args,
        train_dataset=train,
        peft_config=LoraConfig(**LORA) if lora else None,
    )
    trainer.remove_callback(PrinterCallback)
    clock = StepClock()
    trainer.add_callback(clock)
    adapters = AdapterClock(trainer) if lora else None
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "bapo/prefetched" in entry]
    return {
        "overlap": overlap,
        "step_seconds": clock.seconds,
        "generation_seconds": [entry["bapo/generation_seconds"] for entry in logs],
        "generation_wait_seconds": [entry["bapo/generation_wait_seconds"] for entry in logs],
        "prefetched": [entry["bapo/prefetched"] for entry in logs],
        "final_weights_sum": float(sum(param.double().sum() for param in trainer.model.parameters())),
        "adapter_loads": adapters.loads if adapters else [],
    }


def merged(first: dict, second: dict) -> dict:
    """Two runs of one setting as one: their per-step means, and whether they ended with the same weights."""
    mean = {
        key: [(a + b) / 2 for a, b in zip(first[key], second[key])]
        for key in first
        if isinstance(first[key], list) and key != "adapter_loads"
    }
    weights = first["final_weights_sum"] if first["final_weights_sum"] == second["final_weights_sum"] else math.nan
    loads = first.get("adapter_loads", []) + second.get("adapter_loads", [])
    return {**mean, "overlap": first["overlap"], "final_weights_sum": weights, "adapter_loads": loads}


def summarize(sync: dict, overlapped: dict) -> dict:
    """Seconds per step, their ratio, and the bound on what overlap can save (all after the warm-up steps)."""
    kept = range(WARMUP_STEPS, len(sync["step_seconds"]))
    sync_total = sum(sync["step_seconds"][i] for i in kept)
    overlap_total = sum(overlapped["step_seconds"][i] for i in kept)
    # Step i's training: its wall time less its own (waited) generation, in the synchronous run.
    training = [step - wait for step, wait in zip(sync["step_seconds"], sync["generation_wait_seconds"])]
    hideable = sum(
        min(sync["generation_seconds"][i], training[i - 1]) for i in kept if overlapped["prefetched"][i] and i > 0
    )
    prefetched = [i for i in kept if overlapped["prefetched"][i]]
    return {
        "steps_measured": len(kept),
        "sync_seconds_per_step": sync_total / len(kept),
        "overlap_seconds_per_step": overlap_total / len(kept),
        "ratio": overlap_total / sync_total,
        "ideal_ratio": (sync_total - hideable) / sync_total,
        "prefetched_share": len(prefetched) / len(kept),
        "sync_generation_per_step": statistics.fmean(sync["generation_seconds"][i] for i in kept),
        "overlap_wait_per_step": statistics.fmean(overlapped["generation_wait_seconds"][i] for i in kept),
        "overlap_generation_per_prefetched_step": statistics.fmean(
            overlapped["generation_seconds"][i] for i in prefetched
        )
        if prefetched
        else 0.0,
        # The rest of a step: its wall time less the generation it waited for. The bound takes the synchronous
        # run's as training time; where the overlapped run's is lower, the overlap saved more than generation.
        "sync_rest_per_step": statistics.fmean(
            sync["step_seconds"][i] - sync["generation_wait_seconds"][i] for i in kept
        ),
        "overlap_rest_per_step": statistics.fmean(
            overlapped["step_seconds"][i] - overlapped["generation_wait_seconds"][i] for i in kept
        ),
        "same_final_weights": sync["final_weights_sum"] == overlapped["final_weights_sum"],
        # Alpha's adapter loads (the refreshes) of both settings: seconds each, and bytes written.
        "transfer_seconds_per_refresh": _mean_load(sync, overlapped, "seconds"),
        "transfer_bytes_per_refresh": _mean_load(sync, overlapped, "bytes"),
    }


def _mean_load(sync: dict, overlapped: dict, key: str) -> float | None:
    loads = [
        load[key] for run in (sync, overlapped) for load in run.get("adapter_loads", []) if load["kind"] == "alpha"
    ]
    return statistics.fmean(loads) if loads else None


def start_server(model_path: Path, log: Path, lora: bool = False) -> tuple[subprocess.Popen, str]:
    """TRL's `trl vllm-serve` command (vLLM's API server module in place of `vllm serve`, which asks package metadata
    for "vllm"), pinned to core 0; with `lora`, the LoRA flags of docs/scaling.md."""
    import requests
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    port = 8000 + os.getpid() % 1000
    options = ScriptArguments(
        model=str(model_path), host="127.0.0.1", port=port, max_model_len=128, enforce_eager=True
    )
    command = build_command(options)
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        *command[command.index("serve") + 1 :],
    ]
    environment = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_OMP_THREADS_BIND="0", VLLM_CPU_KVCACHE_SPACE="1")
    if lora:
        rank = max(candidate.rank for candidate in SERVER_CANDIDATES)
        command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "3"]
        environment["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    process = subprocess.Popen(
        ["taskset", "-c", "0", *command], stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited; see {log}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(2)
    process.kill()
    raise RuntimeError(f"the vLLM server did not come up in 300 s; see {log}")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=60)


def stand_in_weight_transfer() -> None:
    """STAND-IN for TRL's NCCL weight transfer (`VLLMClient.init_communicator` refuses any device but CUDA): sends
    nothing; the server keeps the weights it loaded."""
    from trl.generation.vllm_client import VLLMClient

    VLLMClient.init_communicator = lambda client, device=0: None
    VLLMClient.update_named_params = lambda client, metadata, named_params: None


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def table(results: dict) -> str:
    lines = [
        "| engine, model | threads | s/step sync | s/step overlap | ratio | ideal ratio (bound) | prefetched steps "
        "| generation s/step (sync) | waited s/step (overlap) | rest of a step s (sync / overlap) | final weights: "
        "float64 sum of all parameters, sync = overlap | weights to the engine per refresh |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine, result in results.items():
        s = result["summary"]
        lines.append(
            f"| {engine}: {result['model']} | {result['threads']} | {s['sync_seconds_per_step']:.3f} | "
            f"{s['overlap_seconds_per_step']:.3f} | {s['ratio']:.2f} | {s['ideal_ratio']:.2f} | "
            f"{s['prefetched_share']:.0%} | {s['sync_generation_per_step']:.3f} | {s['overlap_wait_per_step']:.3f} | "
            f"{s['sync_rest_per_step']:.3f} / {s['overlap_rest_per_step']:.3f} | {s['same_final_weights']} | "
            f"{_transfer(engine, s)} |"
        )
    return "\n".join(lines)


def _transfer(engine: str, summary: dict) -> str:
    if summary.get("transfer_seconds_per_refresh") is not None:
        kib = summary["transfer_bytes_per_refresh"] / 1024
        return f"adapter by file: {summary['transfer_seconds_per_refresh']:.3f} s, {kib:.0f} KiB (inside the step)"
    return "none sent (stand-in)" if engine.startswith("server") else "in-process copy"


def seconds_to_reach(wall_curve: list[list[float]], accuracy: float) -> float:
    """Training wall seconds at the first evaluation after step 0 at or above `accuracy` (inf if never)."""
    return next((seconds for step, seconds, value in wall_curve if step > 0 and value >= accuracy), math.inf)


def time_to_target(records: list[dict]) -> dict:
    """Per seed, GRPO's final held-out accuracy, and the training seconds each method took to first reach it on the
    evaluation grid; the paired difference of BAPO with overlap against BAPO with per-step seeds is its speed-up
    alone (both train the same weights), against GRPO the whole difference."""
    seeds = sorted({r["seed"] for r in records if r["method"] == "grpo"})
    by = {(r["method"], r["seed"]): r for r in records}
    rows = []
    for seed in seeds:
        target = by[("grpo", seed)]["wall_curve"][-1][2]
        row = {"seed": seed, "target": target}
        for method in ("grpo", "bapo", "bapo_overlap"):
            if (method, seed) in by:
                row[method] = seconds_to_reach(by[(method, seed)]["wall_curve"], target)
                row[f"{method}_seconds_per_step"] = by[(method, seed)]["seconds_per_step"]
        rows.append(row)
    return {"rows": rows}


def target_table(summary: dict) -> str:
    lines = [
        "| seed | GRPO's final held-out mean@8 | GRPO s | BAPO s | BAPO + overlap s | s/step GRPO / BAPO / overlap |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        methods = ("grpo", "bapo", "bapo_overlap")
        steps = " / ".join(f"{row.get(f'{m}_seconds_per_step', math.nan):.3f}" for m in methods)
        reached = " | ".join(f"{row.get(m, math.nan):.0f}" for m in methods)
        lines.append(f"| {row['seed']} | {row['target']:.3f} | {reached} | {steps} |")
    return "\n".join(lines)


def plot_wall_curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    colours = {"grpo": "#4C72B0", "bapo": "#DD8452", "bapo_overlap": "#55A868"}
    for record in records:
        if record["method"] in colours:
            seconds = [point[1] for point in record["wall_curve"]]
            accuracy = [point[2] for point in record["wall_curve"]]
            label = record["method"] if record["seed"] == min(r["seed"] for r in records) else None
            axis.plot(seconds, accuracy, color=colours[record["method"]], alpha=0.8, label=label)
    axis.set(xlabel="training wall seconds (evaluations left out)", ylabel="held-out mean@8", title="Accuracy by time")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["hf", "server"])
    parser.add_argument(
        "--target-from", type=Path, help="a benchmark folder (grpo, bapo, bapo_overlap): its time-to-target table"
    )
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--completion-length", type=int, default=24)
    parser.add_argument("--threads", type=int, help="torch threads of the trainer (hf: default torch's own)")
    parser.add_argument("--wide", action="store_true", help="a 25M-parameter model instead of the embedded default")
    parser.add_argument("--lora", action="store_true", help="server: train a LoRA adapter, sent to it by file")
    parser.add_argument(
        "--target-server",
        action="store_true",
        help="time to GRPO's final accuracy on the server with LoRA: GRPO, BAPO, BAPO + overlap, paired by seed",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="--target-server's seeds")
    parser.add_argument("--target-steps", type=int, help="--target-server's steps per run; default: the regime's")
    parser.add_argument(
        "--rule-only", action="store_true", help="--target-server: choose the setting, then stop before the table"
    )
    parser.add_argument("--output-dir", default="bench")
    options = parser.parse_args(argv)
    quiet_libraries()
    output = Path(options.output_dir)
    if options.target_from:
        records = json.loads((options.target_from / "results.json").read_text())["records"]
        summary = time_to_target(records)
        (output / "overlap-target.json").write_text(json.dumps(summary, indent=1))
        plot_wall_curves(records, output / "overlap_target.png")
        write_report(output)
        print(target_table(summary))
        return summary
    if options.target_server:
        return target_on_server(options, output)
    runs = output / "runs" / "overlap"
    runs.mkdir(parents=True, exist_ok=True)
    server = None
    # The embedded default (about 1M parameters), or with --wide a 25M-parameter model of the same architecture and
    # tokenizer (random weights: this bench times steps, it does not train a policy).
    model = (
        build_tiny_model(runs / "wide-model", hidden_size=512, layers=8, heads=8) if options.wide else embedded_model()
    )
    if options.engine == "server":
        if not options.lora:
            stand_in_weight_transfer()
        os.sched_setaffinity(0, {1})
        torch.set_num_threads(1)
        server, url = start_server(model, runs.parent / "overlap-server.log", lora=options.lora)
    else:
        url = None
        if options.threads:
            torch.set_num_threads(options.threads)
    try:
        # In the order sync, overlap, overlap, sync, so that neither gains from coming second (a warm server cache).
        order = (False, True, True, False)
        settings = (options.engine, options.steps, runs, url, options.completion_length, model, options.lora)
        done = [run(overlap, *settings) for overlap in order]
    finally:
        if server is not None:
            stop_server(server)
    result = {
        "engine": options.engine,
        "model": ("wide (25M, random)" if options.wide else "embedded default (1M)")
        + (f", LoRA r={LORA['r']}" if options.lora else ""),
        "kernel_path": kernel_path(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "commit": _commit(),
        "steps": options.steps,
        "completion_length": options.completion_length,
        "summary": summarize(merged(done[0], done[3]), merged(done[1], done[2])),
        "runs": done,
    }
    name = f"{options.engine}{'-wide' if options.wide else ''}{'-lora' if options.lora else ''}"
    (output / f"overlap-{name}.json").write_text(json.dumps(result, indent=1))
    write_report(output)
    print(json.dumps(result["summary"], indent=1))
    return result


def target_on_server(options, output: Path) -> dict:
    """GRPO, BAPO and BAPO with overlap, each training a LoRA adapter against one vLLM CPU server (core 0, trainer on
    core 1), in the carry regime of `make bench`, paired by seed: held-out accuracy by training wall time, and the
    time each takes to reach GRPO's final accuracy. GRPO is BAPOTrainer with BAPO's features off (it sends the
    adapter at every rollout step); BAPO samples with per-step seeds, as the overlapped run must, so the two BAPO
    runs train alike and differ in wall time. The setting is the first of SERVER_CANDIDATES on which GRPO's rule runs
    pass the gate (CANDIDATE/rule/results.json; on file, they are not run again); the table then runs all three
    methods, interleaved by seed, into CANDIDATE/results.json."""
    folder = output / "overlap-target-server"
    regime = dataclasses.replace(REGIMES["carry"], methods=SERVER_METHODS, folder=folder.name)
    steps = options.target_steps or regime.steps
    engine: dict = {}
    stack = contextlib.ExitStack()

    @functools.cache
    def base() -> dict:
        return base_accuracies(regime, tracked_prompts=16)  # the prompts per rollout batch do not change it

    def runs(candidate: Candidate, methods, where: Path) -> list[dict]:
        """The methods' runs at the candidate's setting, interleaved by seed so that drifts in machine load hit every
        method alike; their results.json in `where`. The server starts with the first run."""
        if not engine:
            os.environ["OMP_NUM_THREADS"] = "1"  # each run's process: one torch thread, on core 1 with this one
            os.sched_setaffinity(0, {1})
            torch.set_num_threads(1)
            (output / "runs").mkdir(parents=True, exist_ok=True)
            server, url = start_server(embedded_model(), output / "runs" / "target-server.log", lora=True)
            stack.callback(stop_server, server)
            engine.update(use_vllm=True, vllm_mode="server", vllm_server_base_url=url)
        (where / "runs").mkdir(parents=True, exist_ok=True)
        records = []
        for seed in options.seeds:
            for method in methods:
                records.append(
                    run_in_fresh_process(
                        method,
                        seed,
                        steps,
                        candidate.regime(regime),
                        where / "runs",
                        candidate.learning_rate,
                        base(),
                        engine,
                        candidate.lora,
                    )
                )
                print(candidate.name, method, seed, f"{records[-1]['eval_accuracy']:.3f}")
        write_results(where, sanity_gate(records), base(), candidate.regime(regime), records)
        return records

    def on_file(candidate: Candidate, methods, where: Path) -> dict | None:
        """Runs on file in `where`, if they are the ones asked for now; other runs there are an error, not reused."""
        if not (where / "results.json").exists():
            return None
        saved = json.loads((where / "results.json").read_text())
        asked = sorted(
            (m, seed, steps, candidate.learning_rate, candidate.rank) for m in methods for seed in options.seeds
        )
        found = sorted(
            (r["method"], r["seed"], r["steps"], r["learning_rate"], r["lora"]["r"]) for r in saved["records"]
        )
        if found != asked:
            raise ValueError(
                f"{where / 'results.json'} holds other runs (method, seed, steps, lr, rank) than asked for now: "
                f"{found} against {asked}. Ask for its seeds and steps, or move it away to run these."
            )
        return saved

    if len(options.seeds) < 2:
        raise ValueError("--target-server's gate needs the deviation between seeds: give --seeds at least two.")
    tried, chosen, records = [], None, []
    with stack:
        for candidate in SERVER_CANDIDATES:
            rule = folder / candidate.name / "rule"
            saved = on_file(candidate, ["grpo"], rule) or {"gate": sanity_gate(runs(candidate, ["grpo"], rule))}
            tried.append({"name": candidate.name, **dataclasses.asdict(candidate), "gate": saved["gate"]})
            if saved["gate"]["passed"]:
                chosen = candidate
                break
        if chosen:
            # GRPO runs again beside BAPO: the rule's runs chose the setting, the table's share the machine's state.
            table = folder / chosen.name
            saved = on_file(chosen, list(SERVER_METHODS), table)
            if saved:
                records = saved["records"]
            elif not options.rule_only:
                records = runs(chosen, list(SERVER_METHODS), table)
    summary = {
        "candidates": tried,
        "chosen": chosen and chosen.name,
        **time_to_target(records),
        "gate": sanity_gate(records) if records else None,
        "steps": steps,
        "learning_rate": chosen and chosen.learning_rate,
        "lora": chosen and chosen.lora,
        "kernel_path": kernel_path(),
        "cpu": cpu_name(),
        "commit": _commit(),
    }
    (output / "overlap-target-server.json").write_text(json.dumps(summary, indent=1))
    if records:
        plot_wall_curves(records, output / "overlap_target_server.png")
    write_report(output)
    print(target_table(summary))
    return summary


def engine_results(output: Path) -> dict[str, dict]:
    """Every engine's overlap-ENGINE.json under `output`, by engine, its summary computed again from its runs."""
    results = {}
    for path in sorted(output.glob("overlap-*.json")):
        if not path.stem.startswith("overlap-target"):
            result = json.loads(path.read_text())
            runs = result["runs"]
            result["summary"] = summarize(merged(runs[0], runs[3]), merged(runs[1], runs[2]))
            results[path.stem.removeprefix("overlap-")] = result
    return results


def write_report(output: Path) -> None:
    """bench/OVERLAP.md from every engine's results."""
    results = engine_results(output)
    (output / "OVERLAP.md").write_text(
        "# Overlapped rollout: seconds per step\n\nWritten by `make bench-overlap` "
        "(trl_bapo/examples/overlap_bench.py); docs/overlap.md says what the columns mean.\n\n"
        + table(results)
        + "\n"
        + target_section(output)
    )


def gate_words(candidates: list[dict]) -> str:
    """Each setting --target-server tried, in its rule's order, with GRPO's gate there."""
    return "; ".join(
        f"LoRA r = {c['rank']}, lr {c['learning_rate']:.0e}, {c['prompts']} prompts a rollout batch: median gain "
        f"{c['gate']['grpo_gain']:+.3f}, seed deviation {c['gate']['grpo_seed_stdev']:.3f}, "
        f"{'passed' if c['gate']['passed'] else 'failed'}"
        for c in candidates
    )


def target_section(output: Path) -> str:
    """The time-to-target tables, where `--target-from` and `--target-server` wrote them."""
    text = ""
    path = output / "overlap-target.json"
    if path.exists():
        text += (
            "\n## Wall seconds to GRPO's final held-out accuracy\n\nThe carry regime of `make bench` (300 steps, "
            "held-out mean@8 every 25), transformers' generate, paired by seed: training seconds (evaluations left "
            "out) to the first evaluation at or above GRPO's final accuracy of the same seed; inf: never.\n\n"
            + target_table(json.loads(path.read_text()))
            + "\n\n![accuracy by time](overlap_target.png)\n"
        )
    path = output / "overlap-target-server.json"
    if path.exists():
        summary = json.loads(path.read_text())
        machine = summary["kernel_path"]
        text += (
            "\n## On the vLLM server with LoRA: wall seconds to GRPO's final held-out accuracy\n\n"
            f"`--target-server`: the carry regime ({summary['steps']} steps, held-out mean@8 every 25), a LoRA "
            "adapter on every linear layer sent to a vLLM CPU server by file, server on one core and trainer on the "
            "other; GRPO is BAPOTrainer with BAPO's features off, sending the adapter at every step; BAPO samples "
            "with per-step seeds, as BAPO + overlap does. Paired by seed as above. The setting is the first "
            f"candidate on which GRPO alone passes the gate ({gate_words(summary['candidates'])}). Commit "
            f"{summary['commit']}, {summary['cpu']}, kernel path {machine['cpu_capability']}.\n\n"
            + (
                target_table(summary) + "\n\n![accuracy by time, server](overlap_target_server.png)\n"
                if summary["rows"]
                else f"GRPO passed the gate on {summary['chosen']}; the table has not run yet (`--rule-only`).\n"
                if summary["chosen"]
                else "GRPO passed the gate on no candidate: BAPO was not compared.\n"
            )
        )
    return text


if __name__ == "__main__":
    main()
