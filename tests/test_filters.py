"""Online filters (appendix A.3), the mini-test variant (section 5.2) and the adaptive thresholds (eq. 8)."""

import pytest
from conftest import BatchRecorder, ScriptedReward, bapo_logs, make_config, prompt_dataset

from trl_bapo import BAPOTrainer

STEPS = 8
# Each rollout step: one prompt with 0/4, 4/4, 2/4 and 1/4 correct completions, in that order.
PATTERN = {"w": 0, "x": 4, "y": 2, "z": 1}


def _train(tmp_path, tiny_model_path, steps=STEPS, **overrides):
    plan = {f"{t}{name}=": [k] for t in range(steps) for name, k in PATTERN.items()}
    args = make_config(tmp_path, max_steps=steps, **{"use_high_quality_replay": False, **overrides})
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(plan), args=args, train_dataset=prompt_dataset(list(plan))
    )
    recorder = BatchRecorder(trainer)
    trainer.train()
    kept = [{prompt[-2] for prompt in recorder.per_step[t]} for t in range(1, steps + 1)]
    return trainer, kept


def test_range_filter_keeps_exactly_the_mixed_groups(tiny_model_path, tmp_path):
    _, kept = _train(tmp_path, tiny_model_path, online_filter="range", use_difficult_replay=False)
    assert kept == [{"y", "z"}] * STEPS


def test_no_filter_keeps_every_group(tiny_model_path, tmp_path):
    _, kept = _train(tmp_path, tiny_model_path, online_filter="none", use_difficult_replay=False)
    assert kept == [{"w", "x", "y", "z"}] * STEPS


def test_gaussian_filter_favours_accuracy_near_the_mean(tiny_model_path, tmp_path):
    trainer, kept = _train(tmp_path, tiny_model_path, online_filter="gaussian", use_difficult_replay=False)
    # keep probabilities: 1/2 -> 1.0, 1/4 -> 0.46, 0 and 1 -> 0.04 each
    assert all("y" in step for step in kept)
    assert 0 < sum("z" in step for step in kept) < STEPS
    assert sum("w" in step or "x" in step for step in kept) <= 3
    assert [log["bapo/x1"] for log in bapo_logs(trainer)] == [len(step) for step in kept]


def test_uniform_filter_keeps_a_random_share_regardless_of_accuracy(tiny_model_path, tmp_path):
    _, kept = _train(tmp_path, tiny_model_path, online_filter="uniform", use_difficult_replay=False)
    total = sum(len(step) for step in kept)
    assert 0.3 * 4 * STEPS <= total <= 0.9 * 4 * STEPS
    assert any("w" in step or "x" in step for step in kept), "uniform must not look at accuracy"


def test_adaptive_thresholds_follow_eq_8(tiny_model_path, tmp_path):
    trainer, _ = _train(tmp_path, tiny_model_path, use_difficult_replay=False)
    rewards_so_far = []
    for entry, log in zip([e for e in trainer.state.log_history if "reward" in e], bapo_logs(trainer)):
        rewards_so_far.append(entry["reward"])
        r_tot = sum(rewards_so_far) / len(rewards_so_far)  # equal completions per step
        assert log["bapo/r_tot"] == pytest.approx(r_tot)
        assert log["bapo/c2"] == pytest.approx(r_tot * (4 / 8 - 1 / 8) + 1 / 8)
        assert log["bapo/c3"] == pytest.approx(r_tot * (5 / 8 - 2 / 8) + 2 / 8)


def test_mini_test_replays_all_wrong_prompts_and_half_right_groups(tiny_model_path, tmp_path):
    steps = 4
    plan = {}
    for t in range(steps):
        plan.update({f"{t}w=": [0, 1], f"{t}x=": [1], f"{t}y=": [2], f"{t}z=": [3]})
    args = make_config(tmp_path, max_steps=steps, mini_test=True, reevaluation_interval=2, rollout_delay=1)
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(plan), args=args, train_dataset=prompt_dataset(list(plan))
    )
    recorder = BatchRecorder(trainer)
    trainer.train()
    logs = bapo_logs(trainer)
    assert all(log["bapo/c2"] == log["bapo/c3"] == 0.5 for log in logs)
    # c1 = 0: only the all-wrong prompt of each step enters B_bad; 1/4 is not difficult.
    assert [log["bapo/difficult_buffer"] for log in logs] == [1, 0, 1, 0]
    assert [log["bapo/x2"] for log in logs] == [0, 2, 0, 2]
    for t in range(1, steps + 1):
        trained = set(recorder.per_step[t])
        replayed = {prompt for prompt in trained if int(prompt[0]) < t - 1}
        reevaluated = {prompt for prompt in replayed if prompt[1] == "w"}
        assert {f"{t - 1}x=", f"{t - 1}y=", f"{t - 1}z="} <= trained
        # X3 reuses exactly the groups at accuracy 1/2.
        assert all(prompt[1] == "y" for prompt in replayed - reevaluated), trained
    assert [log["bapo/x3"] for log in logs] == [0, 0, 1, 0]
