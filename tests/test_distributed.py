"""Several processes on CPU over gloo, under each engine users launch BAPO with: DDP, FSDP2, DeepSpeed ZeRO-2/3.

Every test runs `accelerate launch` on tests/distributed_worker.py (which says what it records) and checks what
the processes wrote. accelerate starts several CPU processes only through its multi-GPU launcher (or an engine's
config); they then run over gloo. FSDP2 comes from TRL's shipped config (`--accelerate_config fsdp2`); DeepSpeed
from tests/engines/zero{2,3}.json, where ZeRO-3's `stage3_param_persistence_threshold` of 100 partitions the
tiny model's matrices and keeps its norms (64 values) persistent, as real models have both kinds.
"""

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from conftest import accelerate_settings

from trl_bapo.builtin.embedded import embedded_model

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
ROOT = HERE.parent
ENGINES = {
    "ddp": ["--multi_gpu"],
    "fsdp2": ["--config_file", str(resources.files("trl.accelerate_configs") / "fsdp2.yaml")],
    "zero2": ["--use_deepspeed", "--deepspeed_config_file", str(HERE / "engines" / "zero2.json")],
    "zero3": ["--use_deepspeed", "--deepspeed_config_file", str(HERE / "engines" / "zero3.json")],
}
# FSDP1 from TRL's own fsdp1.yaml, with module states left unsynchronised: accelerate refuses to sync them on CPU.
FSDP1 = ["--config_file", str(HERE / "engines" / "fsdp1.yaml")]
SHARDED = {"fsdp2", "zero3"}
STEPS = 6
REFRESHED_AT = {1: 1, 2: 1, 3: 1, 4: 1, 5: 5, 6: 5}  # v = 5: refreshed at t = 1 and t mod 5 == 0


def run(command: list[str]) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # Bounded: a process waiting on a collective the other never enters would hang here, not pass.
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=HERE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def launch(engine: str, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    return run(
        [sys.executable, "-m", "accelerate.commands.launch", *ENGINES[engine], *accelerate_settings(processes), *args]
    )


def run_worker(engine: str, scenario: str, out: Path, model: str, processes: int = 2) -> list[dict]:
    launch(engine, str(WORKER), scenario, str(out), model, processes=processes)
    return [json.loads((out / f"{scenario}-{rank}.json").read_text()) for rank in range(processes)]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_trains_bapo_with_the_delayed_policy_in_lockstep(engine, tiny_model_path, tmp_path):
    ranks = run_worker(engine, "train", tmp_path, tiny_model_path)
    for key in ("difficult", "high_quality", "counters", "logs", "generations", "trained"):
        assert ranks[0][key] == ranks[1][key], key
    weights = [torch.load(tmp_path / f"weights-{rank}.pt") for rank in range(2)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name

    # The engine really shards: under FSDP2 and ZeRO-3 each process holds half of every parameter, and so does
    # its share of the rollout snapshot, which lives in CPU memory.
    fraction, snapshot = ranks[0]["sharded_fraction"], [rank["snapshot_elements"] for rank in ranks]
    total = sum(weight.numel() for weight in weights[0].values())
    if engine in SHARDED:
        assert 0.45 < fraction < 0.55 and sum(snapshot) == pytest.approx(total, rel=0.01)
    else:
        assert fraction == 1 and snapshot == [total, total]

    logs, trained, generations = ranks[0]["logs"], ranks[0]["trained"], ranks[0]["generations"]
    assert [log["bapo/policy_lag"] for log in logs] == [t - REFRESHED_AT[t] for t in range(1, STEPS + 1)]
    # Fresh rollouts come from alpha, the weights of the last refresh; re-evaluations (t = 2, 4, 6) from the
    # current weights. trained[k] is the fingerprint of the full weights after k optimizer steps.
    fresh = [g for g in generations if g[1]]
    reevaluated = [g for g in generations if not g[1]]
    assert [g[0] for g in fresh] == list(range(STEPS)) and [g[0] for g in reevaluated] == [1, 3, 5]
    for step, _, weights_used in fresh:
        assert weights_used == trained[REFRESHED_AT[step + 1] - 1], f"step {step + 1} did not roll out with alpha"
    for step, _, weights_used in reevaluated:
        assert weights_used == trained[step], f"re-evaluation at step {step + 1} did not use the current policy"
    assert len(set(trained[:6])) == 6, "some step did not move the weights; the lag checks above are vacuous"

    sizes = [log["bapo/x1"] + log["bapo/x2"] + log["bapo/x3"] for log in logs]
    assert sizes == [3, 5, 4, 3, 3, 0], "the scripted composition changed"
    assert logs[-1]["bapo/skipped"] == 1 and trained[-1] == trained[-2], "the empty step moved the weights"
    assert sum(log["bapo/x2"] for log in logs) > 0 and sum(log["bapo/x3"] for log in logs) > 0
    # Same number of forward/backward passes on both processes, and every row trained exactly once across them.
    assert len(ranks[0]["passes"]) == len(ranks[1]["passes"]) == STEPS * 3
    rows = [a + b for a, b in zip(ranks[0]["passes"], ranks[1]["passes"])]
    assert [sum(rows[3 * t : 3 * t + 3]) for t in range(STEPS)] == [size * 4 for size in sizes]


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3"])
def test_resume_on_two_processes_equals_straight_run(engine, tiny_model_path, tmp_path):
    ranks = run_worker(engine, "resume", tmp_path, tiny_model_path)
    for rank in ranks:
        for step in ("4", "5", "6"):
            assert rank["resumed"][step] == rank["straight"][step], f"step {step} differs after the resume"
        assert rank["straight"]["4"]["difficult"] and rank["straight"]["4"]["high_quality"], "buffers were empty"
    # Process 1's state file was corrupted, then deleted: both processes fail, with the same message naming it. The
    # file of process 0 holds shards of the same shapes, which process 1 must not take for its own.
    for key, reason in (("corrupt_error", "not a file of tensors"), ("missing_error", "missing, though 2 processes")):
        errors = [rank[key] for rank in ranks]
        assert errors[0] and errors[0] == errors[1], key
        assert "process 1 could not read" in errors[0] and reason in errors[0], errors[0]
        assert "resume_without_bapo_state" in errors[0]


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_a_checkpoint_inside_a_rollout_step_resumes_it_on_two_processes(engine, tiny_model_path, tmp_path):
    for rank in run_worker(engine, "resume_inside", tmp_path, tiny_model_path):
        for step in ("4", "5", "6"):
            assert rank["resumed"][step] == rank["straight"][step], f"step {step} differs after the resume"


def test_a_failed_state_write_on_one_process_stops_every_process(tiny_model_path, tmp_path):
    """Bounded by `run`'s timeout (600 s), far below the collective's (30 min) that the other process waited on."""
    ranks = run_worker("ddp", "failed_write", tmp_path, tiny_model_path)
    assert ranks[0]["error"] == ranks[1]["error"] and ranks[0]["step"] == 1, ranks
    assert "process 1: Could not write BAPO's state to" in ranks[0]["error"] and "bapo_state_1.pt" in ranks[0]["error"]


def test_reevaluation_with_more_processes_than_difficult_prompts(tiny_model_path, tmp_path):
    ranks = run_worker("ddp", "reevaluate", tmp_path, tiny_model_path, processes=3)
    assert ranks[0] == ranks[1] == ranks[2]
    second = ranks[0]["logs"][1]
    # One prompt in B_bad, scored by 3 processes (2 of them repeat it): it counts once, moves to X2 and leaves B_bad.
    assert second["bapo/reevaluated"] == 1 and second["bapo/x2"] == 1 and ranks[0]["difficult"] == []
    assert second["bapo/rollouts"] == 2 * 24 + 3 * 4


def test_adaptive_clipping_bounds_agree_across_processes(tiny_model_path, tmp_path):
    ranks = run_worker("ddp", "adaptive", tmp_path, tiny_model_path)
    logs = ranks[0]["logs"]
    assert logs == ranks[1]["logs"]  # bounds and contributions were summed over both processes' tokens
    assert {(log["bapo/clip_low"], log["bapo/clip_high"]) for log in logs} != {(0.6, 1.2)}, "the bounds never moved"
    assert all(log["bapo/clip_positive"] + log["bapo/clip_negative"] > 0 for log in logs[:-1])


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_decoupled_correction_agrees_across_processes(engine, tiny_model_path, tmp_path):
    """The anchor pi_start is measured for every row, on each process's share (a collective forward under FSDP2);
    the weights' statistics are summed over both processes: the same logs and weights on both."""
    ranks = run_worker(engine, "decoupled", tmp_path, tiny_model_path)
    assert ranks[0]["logs"] == ranks[1]["logs"] and ranks[0]["trained"] == ranks[1]["trained"]
    logs = ranks[0]["logs"]
    maxima = [
        log[f"bapo/{s}/is_weight_max"] for log in logs for s in ("x1", "x2", "x3") if f"bapo/{s}/is_weight_max" in log
    ]
    assert maxima and max(maxima) <= 1.05 + 1e-6
    assert any(log.get("bapo/x1/is_truncated", 0) > 0 for log in logs), "the stale rollouts were never truncated"
    assert len(set(ranks[0]["trained"][:6])) == 6


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_the_authors_rules_train_in_lockstep(engine, tiny_model_path, tmp_path):
    """recipes/bapo_authors.yaml's rules on two processes: the shared store, the stored X3 anchor and the mini-batch
    aggregation decide alike on both, and a rollout step takes an optimizer step per 12 rows it has, the other step
    leaving the weights where they are."""
    ranks = run_worker(engine, "authors", tmp_path, tiny_model_path)
    for key in ("difficult", "high_quality", "counters", "logs", "trained"):
        assert ranks[0][key] == ranks[1][key], key
    logs, trained = ranks[0]["logs"], ranks[0]["trained"]
    assert len(logs) == STEPS and len(trained) == 2 * STEPS + 1
    taken = []
    for t, log in enumerate(logs):
        rows = 4 * (log["bapo/x1"] + log["bapo/x2"] + log["bapo/x3"])
        assert log["bapo/optimizer_steps"] == -(-rows // 12), f"step {t + 1}: {rows} rows"
        before, first, second = trained[2 * t : 2 * t + 3]
        assert (first != before) == (log["bapo/optimizer_steps"] >= 1) and (second != first) == (rows > 12)
        taken.append(log["bapo/optimizer_steps"])
    assert {1, 2} <= set(taken), f"no underfilled or no full rollout step: {taken}"
    assert sum(log["bapo/reevaluated"] for log in logs) and sum(log["bapo/x3"] for log in logs)
    # Steps 4 and 6 have no mixed group: X1 falls back to the whole batch, which leaves X2 and X3 no room.
    assert [log["bapo/x1"] for log in logs][3::2] == [6, 6] and not any(log["bapo/x2"] for log in logs)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_tracking_snapshots_and_metrics_by_source_on_two_processes(engine, tiny_model_path, tmp_path):
    """Every process measures the tracked prompts alike (a collective generation under FSDP2), holds the same
    buffers and logs the same lag and clip fractions; process 0 alone writes the files, with those numbers."""
    ranks = run_worker(engine, "observe", tmp_path, tiny_model_path)
    for key in ("tracking", "buffers", "logs"):
        assert ranks[0][key] == ranks[1][key], key
    records = [json.loads(line) for line in (tmp_path / "prompt_tracking.jsonl").read_text().splitlines()]
    assert records == ranks[0]["tracking"] and [r["step"] for r in records] == [0, 2, 4, 6]
    saved = (tmp_path / f"checkpoint-{STEPS}" / "bapo_buffers.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in saved] == ranks[0]["buffers"] and saved
    logged = [json.loads(line) for line in (tmp_path / "bapo_buffers.jsonl").read_text().splitlines()]
    assert sorted({line["step"] for line in logged}) == list(range(1, STEPS + 1))
    logs = ranks[0]["logs"]
    assert [log["bapo/x1/lag_max"] for log in logs if log["bapo/x1"]] == [
        t - REFRESHED_AT[t] for t, log in enumerate(logs, start=1) if log["bapo/x1"]
    ]
    assert any("bapo/x3/lag_mean" in log for log in logs) and any("bapo/x1/clip_fraction" in log for log in logs)


def test_off_policy_loss_logs_means_over_every_process_tokens(tiny_model_path, tmp_path):
    """As TRL logs its own losses' entropy and KL: weighted by tokens, not the mean of two processes' means."""
    metrics = run_worker("ddp", "loss_metrics", tmp_path, tiny_model_path)[0]["metrics"]
    for entry in metrics:
        assert entry["logged"] == pytest.approx(entry["tokens"], rel=1e-4, abs=1e-6), entry
    assert {entry["name"] for entry in metrics} == {"entropy", "kl"}
    # The two ways differ somewhere, so the check above can tell them apart.
    assert any(abs(entry["tokens"] - entry["processes"]) > 1e-3 for entry in metrics)


def test_fsdp1_refuses_the_delayed_policy_on_every_process(tiny_model_path, tmp_path):
    run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *FSDP1,
            *accelerate_settings(2),
            str(WORKER),
            "fsdp1",
            str(tmp_path),
            tiny_model_path,
        ]
    )
    ranks = [json.loads((tmp_path / f"fsdp1-{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["fsdp_version"] == 1
    assert "fsdp_version: 2" in ranks[0]["error"] and "rollout_delay=1" in ranks[0]["error"]
    assert "vLLM" not in ranks[0]["error"], "vLLM does not hold alpha in the trainer's place"


def run_trl_bapo(*args: str) -> None:
    """`trl-bapo` as a user runs it, on two CPU processes: what the script does not know goes to accelerate."""
    run([str(Path(sys.executable).parent / "trl-bapo"), *args, "--multi_gpu", *accelerate_settings(2)])


def test_cli_resume_on_two_processes(tmp_path):
    """The commands a user runs: save at step 2 on two processes, then resume from that checkpoint; once under
    `accelerate launch -m trl_bapo.cli`, once with `trl-bapo` starting accelerate itself."""
    embedded_model()  # built here once, not by both processes at the same time
    out = str(tmp_path / "out")
    common = ["--config", str(ROOT / "recipes" / "demo.yaml"), "--output_dir", out]
    launch("ddp", "-m", "trl_bapo.cli", *common, "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "2")
    run_trl_bapo(
        *common,
        "--max_steps",
        "3",
        "--save_steps",
        "3",
        "--save_strategy",
        "steps",
        "--resume_from_checkpoint",
        f"{out}/checkpoint-2",
    )
    history = json.loads(Path(out, "checkpoint-3", "trainer_state.json").read_text())["log_history"]
    rollouts = {entry["step"]: entry["bapo/rollouts"] for entry in history if "bapo/rollouts" in entry}
    # 32 prompts x 8 completions per step on two processes; the count goes on from the checkpoint's.
    assert rollouts == {1: 256, 2: 512, 3: 768}
    assert {"bapo_state_0.pt", "bapo_state_1.pt"} <= set(os.listdir(Path(out, "checkpoint-3")))
