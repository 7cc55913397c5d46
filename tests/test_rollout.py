"""The delayed rollout policy and the importance ratio against stored behavior log-probs."""

import math

import pytest
import torch
from conftest import (
    BatchRecorder,
    ScriptedReward,
    bapo_logs,
    completion_logps,
    make_config,
    parameters,
    prompt_dataset,
)
from transformers import TrainerCallback

from trl_bapo import BAPOTrainer


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


class WeightsAfterStep(TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.weights = [parameters(model)]  # weights[k]: after k optimizer steps

    def on_step_end(self, args, state, control, **kwargs):
        self.weights.append(parameters(self.model))


# Which step's weights generate at each rollout step t (v = 3): t mod v == 0 refreshes (phase 0, Algorithm 1), or
# (t - 1) mod v == 0 (phase 1, the authors' code); the first step always does.
REFRESHED_AT = {0: {1: 1, 2: 1, 3: 3, 4: 3, 5: 3, 6: 6, 7: 6}, 1: {1: 1, 2: 1, 3: 1, 4: 4, 5: 4, 6: 4, 7: 7}}


@pytest.mark.parametrize("phase", [0, 1])
def test_rollout_snapshot_lags_and_reevaluation_uses_current_weights(tiny_model_path, tmp_path, phase):
    steps = 7
    plan = {}
    for t in range(steps):
        plan.update({f"{t}a=": [2], f"{t}b=": [3], f"{t}c=": [0, 0], f"{t}d=": [1, 0]})
    reward = ScriptedReward(plan)
    args = make_config(
        tmp_path,
        max_steps=steps,
        rollout_delay=3,
        rollout_refresh_phase=phase,
        reevaluation_interval=2,
        learning_rate=1e-2,
    )
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(list(plan))
    )
    seen_by_reward = []
    original_call = reward.__call__

    def recording_reward(*a, **k):
        result = original_call(*a, **k)
        seen_by_reward.append((reward.calls[-1], parameters(trainer.model)))
        return result

    trainer.reward_funcs[0] = recording_reward
    trainer.reward_func_names[0] = "scripted_reward"
    weights = WeightsAfterStep(trainer.model)
    trainer.add_callback(weights)
    before_loss = {}
    original_loss = trainer.compute_loss

    def compute_loss(model, inputs, *a, **k):
        before_loss.setdefault(trainer.state.global_step + 1, parameters(trainer.model))
        return original_loss(model, inputs, *a, **k)

    trainer.compute_loss = compute_loss
    trainer.train()

    refresh = REFRESHED_AT[phase]
    fresh = [(c, w) for c, w in seen_by_reward if all(n == 0 for n in c["scored"].values())]
    reevaluated = [(c, w) for c, w in seen_by_reward if all(n > 0 for n in c["scored"].values())]
    assert len(fresh) == steps
    for t, (_, used) in enumerate(fresh, start=1):
        assert _same(used, weights.weights[refresh[t] - 1]), f"step {t} did not generate with the snapshot"
        # Generation swapped the snapshot in and out: training continues from the trained weights.
        assert _same(before_loss[t], weights.weights[t - 1]), f"step {t} trained from the wrong weights"
    assert [c["step"] + 1 for c, _ in reevaluated] == [2, 4, 6]
    for call, used in reevaluated:
        assert _same(used, weights.weights[call["step"]]), "re-evaluation did not use the current policy"
    assert not _same(weights.weights[2], weights.weights[0]), "the policy did not move; the lag test is vacuous"
    assert [log["bapo/policy_lag"] for log in bapo_logs(trainer)] == [t - refresh[t] for t in range(1, steps + 1)]


def test_replayed_sample_ratio_is_taken_against_stored_behavior_logps(tiny_model_path, tmp_path):
    steps = 5
    plan = {}
    for t in range(steps):
        plan.update({f"{t}a=": [2], f"{t}b=": [2], f"{t}c=": [0], f"{t}d=": [0]})
    args = make_config(
        tmp_path,
        max_steps=steps,
        rollout_delay=3,
        learning_rate=2e-2,
        loss_type="grpo",
        epsilon=100.0,  # no clipping, so the loss shows the ratio itself
        use_difficult_replay=False,
        high_quality_lower_range=[0.5, 0.5],
        high_quality_upper_range=[0.5, 0.5],
    )
    scripted = ScriptedReward(plan)
    behavior = {}

    def reward(prompts, completions, completion_ids, **kwargs):
        # Independent oracle: log-probs of each completion under the weights that just generated it.
        for prompt, ids in zip(prompts, completion_ids):
            behavior[(prompt, tuple(ids))] = completion_logps(trainer.model, trainer.processing_class, prompt, ids)
        return scripted(prompts, completions, **kwargs)

    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(list(plan))
    )
    recorder = BatchRecorder(trainer)
    checked, largest_gap = [], 0.0
    original_loss = trainer.compute_loss  # the recorder's wrapper, which calls the trainer's

    def compute_loss(model, inputs, *a, **k):
        nonlocal largest_gap
        step = trainer.state.global_step + 1
        tokenizer = trainer.processing_class
        expected_rows = []
        for row in range(len(inputs["prompt_ids"])):
            mask = inputs["completion_mask"][row].bool()
            prompt = tokenizer.decode(inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()])
            ids = inputs["completion_ids"][row][mask].tolist()
            if not ids:
                expected_rows.append(torch.tensor(0.0))
                continue
            current = completion_logps(trainer.model, tokenizer, prompt, ids)
            # Fresh rows come from the snapshot, replayed rows from an earlier step: either way the oracle
            # recorded the log-probs of the policy that generated them.
            stored = behavior[(prompt, tuple(ids))]
            if "old_per_token_logps" in inputs:
                torch.testing.assert_close(inputs["old_per_token_logps"][row][mask], stored, atol=1e-5, rtol=0)
            if int(prompt[0]) + 1 < step:
                largest_gap = max(largest_gap, float((current - stored).abs().max()))
                checked.append(prompt)
            ratio = torch.exp(current - stored)
            expected_rows.append((-ratio * inputs["advantages"][row]).mean())
        loss = original_loss(model, inputs, *a, **k)
        expected = torch.stack(expected_rows).mean() / args.gradient_accumulation_steps
        expected = expected * inputs["bapo_loss_scale"]
        torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-4)
        return loss

    trainer.compute_loss = compute_loss
    trainer.train()

    assert checked, "no replayed sample was trained on"
    assert sum(log["bapo/x3"] for log in bapo_logs(trainer)) >= 4
    assert largest_gap > 1e-3, "stored and current log-probs coincide; the ratio check is vacuous"
    assert not math.isnan(trainer.state.log_history[-1]["train_loss"])
    assert recorder.per_step
