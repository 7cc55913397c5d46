"""Checkpoint and resume: BAPO's buffers, counters and rollout snapshot travel with every checkpoint."""

import os

import pytest
import torch
from transformers import TrainerCallback

from trl_bapo import BAPOTrainer
from trl_bapo.trainer import BAPO_STATE_FILE

from conftest import ScriptedReward, make_config, parameters, prompt_dataset

PLAN = {f"{t}{name}=": ks for t in range(8) for name, ks in zip("abcd", [[2], [0, 2], [0, 0], [1]])}
SETTINGS = dict(max_steps=6, rollout_delay=4, reevaluation_interval=2, learning_rate=1e-2, beta=0.01)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(output_dir, reward, **overrides):
    args = make_config(output_dir, **{**SETTINGS, **overrides})
    return BAPOTrainer(model=reward.model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(list(PLAN)))


def _state(trainer):
    return {
        "weights": parameters(trainer.model),
        "difficult": trainer._difficult.prompts(),
        "high_quality": [(g.prompt, g.step, g.accuracy) for g in trainer._high_quality.groups()],
        "snapshot": {name: w.clone() for name, w in trainer._snapshot.weights.items()},
        "counters": (trainer._rollout_step, trainer._rollouts, trainer._reward_sum, trainer._reward_count),
    }


def _reward(tiny_model_path):
    reward = ScriptedReward(PLAN)
    reward.model_path = tiny_model_path
    return reward


def _interrupted_run(tiny_model_path, tmp_path):
    reward = _reward(tiny_model_path)
    first = _trainer(tmp_path / "split", reward, save_strategy="steps", save_steps=3)
    first.add_callback(StopAt(3))
    first.train()
    assert first.state.global_step == 3
    return reward, tmp_path / "split" / "checkpoint-3"


def test_six_steps_equal_three_plus_resume_plus_three(tiny_model_path, tmp_path):
    straight = _trainer(tmp_path / "straight", _reward(tiny_model_path))
    straight.train()

    reward, checkpoint = _interrupted_run(tiny_model_path, tmp_path)
    assert os.path.exists(checkpoint / BAPO_STATE_FILE)
    resumed = _trainer(tmp_path / "split", reward, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    expected, actual = _state(straight), _state(resumed)
    assert actual["counters"] == expected["counters"]
    assert actual["difficult"] == expected["difficult"] and expected["difficult"]
    assert actual["high_quality"] == expected["high_quality"] and expected["high_quality"]
    for name in expected["weights"]:
        torch.testing.assert_close(actual["weights"][name], expected["weights"][name], atol=0, rtol=0, msg=name)
    for name in expected["snapshot"]:
        torch.testing.assert_close(actual["snapshot"][name], expected["snapshot"][name], atol=0, rtol=0)


def test_resume_without_bapo_state_fails_clearly_unless_asked(tiny_model_path, tmp_path):
    reward, checkpoint = _interrupted_run(tiny_model_path, tmp_path)
    (checkpoint / BAPO_STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="resume_without_bapo_state"):
        _trainer(tmp_path / "split", reward).train(resume_from_checkpoint=str(checkpoint))
    os.remove(checkpoint / BAPO_STATE_FILE)
    with pytest.raises(ValueError, match="missing or unreadable"):
        _trainer(tmp_path / "split", reward).train(resume_from_checkpoint=str(checkpoint))

    empty = _trainer(tmp_path / "split", reward, resume_without_bapo_state=True)
    empty.train(resume_from_checkpoint=str(checkpoint))
    assert empty.state.global_step == 6
    assert empty._rollout_step == 3  # counted from the resume: the buffers started empty
