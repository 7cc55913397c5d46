"""Rewards that are not 0/1 (an accuracy reward beside a format reward), reward scaling over the assembled batch,
and TRL's completions table, all through `trainer.train()` on the tiny model."""

import logging
import time

import pytest
from conftest import ScriptedReward, bapo_logs, make_config, prompt_dataset

from trl_bapo import BAPOConfig, BAPOTrainer
from trl_bapo import trainer as trainer_module

PLAN = {f"{t}{name}=": ks for t in range(6) for name, ks in zip("abcd", [[2], [4], [0, 2], [1]])}
COMPOSITION = ("bapo/x1", "bapo/x2", "bapo/x3", "bapo/difficult_buffer", "bapo/high_quality_buffer", "bapo/r_tot")


def format_reward(completions, **kwargs):
    """A shaping reward in [0, 0.5]: it changes every sum of rewards, never which completion is right."""
    return [0.1 * (len(completion) % 6) for completion in completions]


def train(model_path, output_dir, reward_funcs, **overrides):
    """Four rollout steps (re-evaluation at t = 2 and 4); returns the per-step composition and the trainer."""
    args = make_config(
        output_dir,
        max_steps=4,
        rollout_delay=2,
        reevaluation_interval=2,
        high_quality_lower_range=[0.25, 0.25],
        high_quality_upper_range=[0.5, 0.5],
        **overrides,
    )
    trainer = BAPOTrainer(
        model=model_path, reward_funcs=reward_funcs, args=args, train_dataset=prompt_dataset(list(PLAN))
    )
    trainer.train()
    return [{key: log[key] for key in COMPOSITION} for log in bapo_logs(trainer)], trainer


def test_correctness_reward_decides_accuracy_beside_a_format_reward(tiny_model_path, tmp_path, caplog):
    alone, _ = train(tiny_model_path, tmp_path / "alone", [ScriptedReward(PLAN)])
    with caplog.at_level(logging.WARNING):
        ruled, trainer = train(
            tiny_model_path,
            tmp_path / "ruled",
            [ScriptedReward(PLAN), format_reward],
            correctness_reward="scripted_reward",
        )
    # Which prompts are difficult, which come back in X2, B_high's band and r_tot depend on correctness alone; X1
    # keeps every group the summed rewards give a signal (the format reward splits some all-correct groups).
    buffers = ("bapo/x2", "bapo/difficult_buffer", "bapo/r_tot")
    assert [{k: s[k] for k in buffers} for s in ruled] == [{k: s[k] for k in buffers} for s in alone]
    assert any(step["bapo/x2"] for step in alone) and any(step["bapo/x3"] for step in alone)
    assert all(r["bapo/x1"] >= a["bapo/x1"] for r, a in zip(ruled, alone))
    assert trainer.bapo_status.correctness == "reward `scripted_reward` >= 1 (correctness_reward)"
    assert not [r for r in caplog.records if "BAPO's correctness" in r.getMessage()]
    # The format reward still shapes the advantages the loss sees.
    assert trainer.state.log_history[0]["rewards/format_reward/mean"] > 0

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        unstated, trainer = train(tiny_model_path, tmp_path / "unstated", [ScriptedReward(PLAN), format_reward])
    # Unstated, neither reward is TRL's accuracy reward, and BAPO never picks one from their values: the buffers stay
    # off, said once, with both rewards and the setting that turns them on.
    assert all(s["bapo/difficult_buffer"] == s["bapo/x2"] == s["bapo/x3"] == 0 for s in unstated), unstated
    said = [r.getMessage() for r in caplog.records if "BAPO's correctness" in r.getMessage()]
    assert len(said) == 1 and all(
        word in said[0] for word in ("scripted_reward", "format_reward", "correctness_reward")
    )


def test_correctness_reward_must_name_a_reward_function_before_anything_loads(tmp_path):
    """Neither the model nor the reward model exists: the check comes before TRL would load them."""
    args = make_config(tmp_path, correctness_reward="accuracy_reward")
    names = r"\['scripted_reward', 'reward-model'\]"
    with pytest.raises(ValueError, match=rf"correctness_reward='accuracy_reward' names none of .*{names}"):
        BAPOTrainer(
            model=str(tmp_path / "no-model-here"),
            reward_funcs=[ScriptedReward(PLAN), str(tmp_path / "org" / "reward-model")],
            args=args,
            train_dataset=prompt_dataset(list(PLAN)),
        )


def test_assembly_seconds_count_the_behavior_forwards_after_assembly(tiny_model_path, tmp_path, monkeypatch):
    """The behavior log-probs still missing when the batch is cut are measured per micro-batch, after assembly:
    BAPO's work too. Each micro-batch's measure is made to take at least 0.25 s here."""
    finish = trainer_module.finish_behavior_logps

    def slow_finish(trainer, chunk):
        time.sleep(0.25)
        return finish(trainer, chunk)

    monkeypatch.setattr(trainer_module, "finish_behavior_logps", slow_finish)
    _, trainer = train(tiny_model_path, tmp_path, [ScriptedReward(PLAN)])
    micro_batches = trainer.args.steps_per_generation
    assert all(log["bapo/assembly_seconds"] >= 0.25 * micro_batches for log in bapo_logs(trainer))


def test_batch_reward_scaling_is_refused_unless_bapo_leaves_the_batch_alone(tmp_path):
    with pytest.raises(ValueError, match="scale_rewards='batch'.*Algorithm 1, line 18"):
        BAPOConfig(output_dir=str(tmp_path), scale_rewards="batch", use_cpu=True)
    grpo = dict(rollout_delay=1, online_filter="none", use_difficult_replay=False, use_high_quality_replay=False)
    assert BAPOConfig(output_dir=str(tmp_path), scale_rewards="batch", use_cpu=True, **grpo).scale_rewards == "batch"


def test_completions_table_holds_the_training_rollout_not_the_reevaluation(tiny_model_path, tmp_path):
    logs, trainer = train(tiny_model_path, tmp_path, [ScriptedReward(PLAN)], log_completions=True)
    reevaluated = [log["bapo/reevaluated"] for log in bapo_logs(trainer)]
    assert reevaluated[1] and reevaluated[3], reevaluated
    # The table keeps one rollout batch: after step 4, the fresh prompts of that step, not B_bad's re-evaluation.
    assert set(trainer._logs["prompt"]) == {f"3{name}=" for name in "abcd"}
    assert len(trainer._logs["prompt"]) == trainer.args.generation_batch_size
