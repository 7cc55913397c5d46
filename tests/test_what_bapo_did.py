"""What BAPO did, through `train()`: prompt tracking, buffer snapshots, and staleness by source."""

import json
from collections import Counter

import pytest
import torch
from conftest import ScriptedReward, StopAt, bapo_logs, make_config, parameters, prompt_dataset

from trl_bapo import BAPOConfig, BAPOTrainer
from trl_bapo.examples import demo
from trl_bapo.examples.evaluation import relock_rate, unlock_rate
from trl_bapo.staleness import source_clip_counts
from trl_bapo.tracking import TRACKING_FILE

GROUP = 4
TRAIN = [f"{i}{c}=" for i in range(8) for c in "abcd"]
HELD_OUT = [f"{i}z=" for i in range(6)]


def digit_reward(prompts, completions, **kwargs):
    """Right when the completion holds a digit: the tiny model's sampling decides it, and training moves it."""
    return [float(any(ch.isdigit() for ch in completion)) for completion in completions]


def _tracking_trainer(output_dir, model_path, **overrides):
    settings = dict(
        max_steps=4,
        learning_rate=5e-2,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=8,
        track_prompts=True,
    )
    args = make_config(output_dir, **{**settings, **overrides})
    return BAPOTrainer(
        model=model_path,
        reward_funcs=digit_reward,
        args=args,
        train_dataset=prompt_dataset(TRAIN),
        eval_dataset=prompt_dataset(HELD_OUT),
    )


def _records(output_dir):
    return [json.loads(line) for line in (output_dir / TRACKING_FILE).read_text().splitlines()]


def test_prompt_tracking_records_every_evaluation_and_leaves_training_alone(tiny_model_path, tmp_path):
    tracked = _tracking_trainer(tmp_path / "tracked", tiny_model_path)
    tracked.train()
    records = _records(tmp_path / "tracked")
    assert [r["step"] for r in records] == [0, 2, 4] and [r["baseline"] for r in records] == [True, False, False]
    baseline = records[0]["accuracy"]
    for record in records:
        accuracy = record["accuracy"]
        assert len(accuracy) == len(HELD_OUT) and all(a * GROUP == round(a * GROUP) for a in accuracy)
        counts = Counter(round(a * GROUP) for a in accuracy)
        assert record["bins"] == [counts[k] for k in range(GROUP + 1)]
    last = records[-1]
    assert last["unlocked"] == sum(b == 0 and a > 0 for b, a in zip(baseline, last["accuracy"]))
    assert last["relocked"] == sum(b > 0 and a == 0 for b, a in zip(baseline, last["accuracy"]))
    assert sum(map(sum, last["migration"])) == len(HELD_OUT)
    assert [p["prompt"] for p in last["most_improved"]] == [
        HELD_OUT[i]
        for i in sorted(range(len(HELD_OUT)), key=lambda i: last["accuracy"][i] - baseline[i], reverse=True)
        if last["accuracy"][i] > baseline[i]
    ][: len(last["most_improved"])]
    assert records[0]["accuracy"] != records[-1]["accuracy"], "training did not move the measurement"

    # The measurement samples from its own seed: training is the same as without it, evaluations included.
    untracked = _tracking_trainer(tmp_path / "untracked", tiny_model_path, track_prompts=False)
    untracked.train()
    assert not (tmp_path / "untracked" / TRACKING_FILE).exists()
    expected, actual = parameters(untracked.model), parameters(tracked.model)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    rewards = [[entry.get("reward") for entry in t.state.log_history] for t in (untracked, tracked)]
    assert rewards[0] == rewards[1]


def test_prompt_tracking_resume_continues_the_file(tiny_model_path, tmp_path):
    straight = _tracking_trainer(tmp_path / "straight", tiny_model_path)
    straight.train()
    split = _tracking_trainer(tmp_path / "split", tiny_model_path, save_strategy="steps", save_steps=2)
    split.add_callback(StopAt(3))  # dies after step 3: a record of step 2 and none later
    split.train()
    assert [r["step"] for r in _records(tmp_path / "split")] == [0, 2]
    resumed = _tracking_trainer(tmp_path / "split", tiny_model_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    assert _records(tmp_path / "split") == _records(tmp_path / "straight")


def test_track_prompts_needs_an_evaluation(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="track_prompts=True .* eval_strategy='no'"):
        BAPOConfig(str(tmp_path), track_prompts=True)
    args = make_config(tmp_path, track_prompts=True, eval_strategy="steps", eval_steps=2)
    several = {"a": prompt_dataset(HELD_OUT), "b": prompt_dataset(HELD_OUT)}
    with pytest.raises(ValueError, match="track_prompts=True measures the prompts of one eval_dataset"):
        BAPOTrainer(tiny_model_path, digit_reward, args, train_dataset=prompt_dataset(TRAIN), eval_dataset=several)


def test_demo_tracking_counts_equal_the_benchmarks_own(tmp_path):
    """`make demo` tracks the held-out prompts; its file's counts are the ones the benchmark's evaluation helpers
    compute from the same accuracies, and the demo's summary reports the file's."""
    summary = demo.main(["--steps", "4", "--eval-steps", "2", "--output-dir", str(tmp_path)])
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 2, 4]
    baseline, last = records[0]["accuracy"], records[-1]
    unsolved, solved = last["unsolved_at_baseline"], last["solved_at_baseline"]
    assert unsolved == sum(a == 0 for a in baseline) and solved == len(baseline) - unsolved
    assert last["unlocked"] == round(unlock_rate(baseline, last["accuracy"]) * unsolved)
    assert last["relocked"] == round(relock_rate(baseline, last["accuracy"]) * solved)
    assert summary["unlocked"] == last["unlocked"] and summary["unsolved_before"] == unsolved
    for plot in ("accuracy_bins.png", "migration.png"):
        assert (tmp_path / plot).stat().st_size > 0


# ---- buffer snapshots and staleness by source ----------------------------------------------------------------

PLAN = dict(zip(TRAIN, [[0], [2, 2, 0], [1], [4], [0, 2]] * 7))
SNAPSHOT_SETTINGS = dict(
    max_steps=6,
    rollout_delay=3,
    reevaluation_interval=2,
    high_quality_buffer_steps=3,
    high_quality_lower_range=[0.25, 0.25],
    high_quality_upper_range=[0.75, 0.75],
    learning_rate=1e-2,
)


def _snapshot_trainer(output_dir, model_path, **overrides):
    args = make_config(output_dir, **{**SNAPSHOT_SETTINGS, **overrides})
    return BAPOTrainer(
        model=model_path, reward_funcs=ScriptedReward(PLAN), args=args, train_dataset=prompt_dataset(list(PLAN))
    )


def test_buffer_snapshots_hold_what_the_buffers_hold(tiny_model_path, tmp_path):
    trainer = _snapshot_trainer(
        tmp_path, tiny_model_path, save_strategy="steps", save_steps=6, log_buffer_snapshots=True
    )
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "checkpoint-6" / "bapo_buffers.jsonl").read_text().splitlines()]
    status, t = trainer.bapo_status, trainer.bapo_status.rollout_step
    difficult = [line for line in lines if line["buffer"] == "difficult"]
    high = [line for line in lines if line["buffer"] == "high_quality"]
    assert [line["prompt"] for line in difficult] == list(status.difficult_prompts)
    assert [(line["prompt"], line["entered"], line["accuracy"]) for line in high] == [
        (group.prompt, group.step, group.accuracy) for group in status.high_quality_groups
    ]
    assert difficult and high, "the scripted run left a buffer empty: the checks above are vacuous"
    assert all(line["age"] == t - line["entered"] for line in lines)
    # Re-evaluation runs every 2 steps on every prompt held, after the step's own prompts entered: one that entered
    # at step s was re-evaluated at every even step from s to t.
    assert all(line["reevaluated"] == t // 2 - (line["entered"] - 1) // 2 for line in difficult), difficult
    logs = bapo_logs(trainer)
    assert 0 < sum(line["replayed"] for line in high) <= sum(log["bapo/x3"] for log in logs)

    # One snapshot per logging step, tagged with its step; the last equals the checkpoint's.
    logged = [json.loads(line) for line in (tmp_path / "bapo_buffers.jsonl").read_text().splitlines()]
    assert sorted({line["step"] for line in logged}) == list(range(1, 7))
    assert [{k: v for k, v in line.items() if k != "step"} for line in logged if line["step"] == 6] == lines


def test_policy_lag_and_clip_fraction_by_source(tiny_model_path, tmp_path):
    trainer = _snapshot_trainer(tmp_path, tiny_model_path, learning_rate=5e-2)
    trainer.train()
    logs = bapo_logs(trainer)
    for log in logs:
        if log["bapo/x1"]:
            assert log["bapo/x1/lag_mean"] == log["bapo/x1/lag_max"] == log["bapo/policy_lag"]
        if log["bapo/x2"]:
            assert log["bapo/x2/lag_max"] == 0
        # An X3 group of step s came from the alpha of step s; alpha is refreshed every 3 steps, B_high keeps 3.
        if log["bapo/x3"]:
            assert 1 <= log["bapo/x3/lag_mean"] <= log["bapo/x3/lag_max"] <= 3 + 2
    assert any(log.get("bapo/x3", 0) for log in logs) and any(log.get("bapo/x2", 0) for log in logs)
    names = [f"bapo/{source}/clip_fraction" for source in ("x1", "x3")]
    fractions = [log[name] for log in logs for name in names if name in log]
    assert fractions and all(0 <= f <= 1 for f in fractions)
    assert max(fractions) > 0, "stale rows were never clipped at a 5e-2 learning rate"


def test_on_policy_rows_are_never_clipped(tiny_model_path, tmp_path):
    """One update per rollout with the current policy: every ratio is exactly 1, so nothing is clipped."""
    trainer = _snapshot_trainer(tmp_path, tiny_model_path, rollout_delay=1, use_high_quality_replay=False)
    trainer.train()
    fractions = [log["bapo/x1/clip_fraction"] for log in bapo_logs(trainer) if "bapo/x1/clip_fraction" in log]
    assert fractions and set(fractions) == {0.0}


def test_clip_counts_by_hand():
    log_ratio = torch.log(torch.tensor([[0.7, 1.0, 1.3], [0.7, 1.3, 1.0], [1.3, 0.7, 1.0]]))
    advantages = torch.tensor([-1.0, 1.0, 1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    source = torch.tensor([1, 1, 3])
    counts = source_clip_counts(log_ratio, advantages, mask, source, 0.2, 0.2)
    # Row 0 (x1, A < 0): 0.7 is clipped. Row 1 (x1, A > 0): 1.3 is; its third token carries no loss. Row 2 (x3): 1.3.
    assert counts.tolist() == [[2.0, 5.0], [0.0, 0.0], [1.0, 3.0]]
