"""DAPO dynamic sampling through `trainer.train()`."""

from conftest import GROUP_SIZE, BatchRecorder, ScriptedReward, bapo_logs, make_config, prompt_dataset

from trl_bapo import BAPOTrainer

DAPO = dict(
    dynamic_sampling=True,
    rollout_delay=1,
    use_difficult_replay=False,
    use_high_quality_replay=False,
    epsilon_high=0.28,
    loss_type="dapo",
)


def test_dynamic_sampling_fills_the_batch_with_mixed_groups(tiny_model_path, tmp_path):
    # The first rollout batch (dataset order) has a single mixed group; every other prompt is mixed.
    plan = {"a=": [2], "b=": [0], "c=": [4], "d=": [0]}
    plan.update({f"{i}=": [1 + i % 3] for i in range(40)})
    args = make_config(tmp_path, max_steps=2, **DAPO)
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(plan), args=args, train_dataset=prompt_dataset(list(plan))
    )
    recorder = BatchRecorder(trainer)
    trainer.train()
    first = bapo_logs(trainer)[0]
    assert first["bapo/sampling_rounds"] >= 2
    assert first["bapo/x1"] == 4, "DAPO trains on exactly B groups once it has them"
    assert first["bapo/rollouts"] == first["bapo/sampling_rounds"] * 4 * GROUP_SIZE
    assert "a=" in recorder.per_step[1] and not {"b=", "c=", "d="} & set(recorder.per_step[1])
    assert sum(recorder.per_step[1].values()) == 4 * GROUP_SIZE


def test_dynamic_sampling_stops_at_the_round_cap(tiny_model_path, tmp_path):
    prompts = [f"{i}=" for i in range(40)]
    args = make_config(tmp_path, max_steps=2, dynamic_sampling_max_rounds=3, **DAPO)
    trainer = BAPOTrainer(
        model=tiny_model_path,
        reward_funcs=ScriptedReward({}, default=0),
        args=args,
        train_dataset=prompt_dataset(prompts),
    )
    trainer.train()
    logs = bapo_logs(trainer)
    assert [log["bapo/sampling_rounds"] for log in logs] == [3, 3]
    assert [log["bapo/rollouts"] for log in logs] == [3 * 16, 6 * 16]
    assert all(log["bapo/skipped"] == 1 for log in logs)
