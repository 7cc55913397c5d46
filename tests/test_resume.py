"""Checkpoint and resume: BAPO's buffers, counters and rollout snapshot travel with every checkpoint."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ScriptedReward, StopAt, bapo_logs, make_config, parameters, prompt_dataset
from PIL import Image

from trl_bapo import BAPOTrainer
from trl_bapo.checkpoint import load_state, read_state, state_file, write_state

PLAN = {f"{t}{name}=": ks for t in range(8) for name, ks in zip("abcd", [[2], [0, 2], [0, 0], [1]])}
SETTINGS = dict(max_steps=6, rollout_delay=4, reevaluation_interval=2, learning_rate=1e-2, beta=0.01)


def _trainer(output_dir, reward, **overrides):
    args = make_config(output_dir, **{**SETTINGS, **overrides})
    return BAPOTrainer(
        model=reward.model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(list(PLAN))
    )


def _state(trainer):
    return {
        "weights": parameters(trainer.model),
        "difficult": list(trainer.bapo_status.difficult_prompts),
        "high_quality": [(g.prompt, g.step, g.accuracy) for g in trainer.bapo_status.high_quality_groups],
        "snapshot": {name: w.clone() for name, w in trainer._bapo.snapshot.weights.items()},
        "counters": (
            trainer._bapo.rollout_step,
            trainer._bapo.rollouts,
            trainer._bapo.reward_sum,
            trainer._bapo.reward_count,
        ),
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
    assert os.path.exists(state_file(checkpoint, 0))
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
    with open(state_file(checkpoint, 0), "wb") as file:
        file.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="resume_without_bapo_state"):
        _trainer(tmp_path / "split", reward).train(resume_from_checkpoint=str(checkpoint))
    os.remove(state_file(checkpoint, 0))
    with pytest.raises(ValueError, match="could not read .*FileNotFoundError"):
        _trainer(tmp_path / "split", reward).train(resume_from_checkpoint=str(checkpoint))

    empty = _trainer(tmp_path / "split", reward, resume_without_bapo_state=True)
    empty.train(resume_from_checkpoint=str(checkpoint))
    assert empty.state.global_step == 6
    assert empty._bapo.rollout_step == 3  # counted from the resume: the buffers started empty


def test_resume_from_a_model_only_checkpoint_says_so(tiny_model_path, tmp_path):
    """save_only_model=True writes the model alone: the error says that, not that another trainer wrote it."""
    reward = _reward(tiny_model_path)
    first = _trainer(tmp_path / "out", reward, save_strategy="steps", save_steps=2, save_only_model=True, max_steps=2)
    first.train()
    with pytest.raises(ValueError, match="save_only_model=True") as raised:
        _trainer(tmp_path / "out", reward).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert "written by BAPOTrainer" not in str(raised.value) and "resume_without_bapo_state" in str(raised.value)


class RunsCodeOnLoad:
    """Unpickling this calls `print`: a stand-in for a tampered checkpoint that runs code."""

    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


def test_state_that_would_run_code_is_refused(tiny_model_path, tmp_path, capsys):
    reward, checkpoint = _interrupted_run(tiny_model_path, tmp_path)
    torch.save({"version": 2, "payload": RunsCodeOnLoad()}, state_file(checkpoint, 0))
    with pytest.raises(ValueError, match="could not read .*not a file of tensors and plain data"):
        _trainer(tmp_path / "split", reward).train(resume_from_checkpoint=str(checkpoint))
    assert "code ran" not in capsys.readouterr().out


def test_changed_buffer_settings_apply_on_resume_with_a_note(tiny_model_path, tmp_path, caplog):
    reward, checkpoint = _interrupted_run(tiny_model_path, tmp_path)
    resumed = _trainer(tmp_path / "split", reward, difficult_buffer_size=1, rollout_delay=2, max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    notes = [r.getMessage() for r in caplog.records if "the configured value applies" in r.getMessage()]
    assert any(n.startswith("difficult_buffer_size was 4") and "is 1 now" in n for n in notes), notes
    assert any(n.startswith("rollout_delay was 4") and "is 2 now" in n for n in notes), notes
    assert len(resumed.bapo_status.difficult_prompts) == 1 and resumed._bapo.snapshot.delay == 2
    # t = 4 is a refresh step under the new delay of 2.
    assert bapo_logs(resumed)[-1]["bapo/policy_lag"] == 0


def test_state_file_keeps_images_and_arrays_of_dataset_rows(tmp_path):
    """B_bad keeps dataset rows; an image or array column survives the safe (weights_only) round trip."""
    image = Image.new("RGB", (3, 2), color=(10, 200, 30))
    rows = [{"prompt": [{"role": "user", "content": "2+3="}], "image": image, "mask": np.arange(4), "n": np.int64(7)}]
    write_state(str(tmp_path / "state.pt"), {"difficult": {"examples": rows}})
    loaded = read_state(str(tmp_path / "state.pt"))["difficult"]["examples"][0]
    assert loaded["prompt"] == rows[0]["prompt"] and loaded["n"] == 7
    assert np.array_equal(loaded["mask"], rows[0]["mask"])
    assert loaded["image"].mode == "RGB" and list(loaded["image"].getdata()) == list(image.getdata())
    # Modes PNG cannot hold (32-bit floats here) are kept as TIFF.
    floats = Image.new("F", (2, 2), color=0.25)
    write_state(str(tmp_path / "floats.pt"), {"image": floats})
    loaded = read_state(str(tmp_path / "floats.pt"))["image"]
    assert loaded.mode == "F" and list(loaded.getdata()) == [0.25] * 4
    with pytest.raises(TypeError, match=r"state\['difficult'\]\['examples'\]\[0\]\['when'\] of type object"):
        write_state(str(tmp_path / "bad.pt"), {"difficult": {"examples": [{"when": object()}]}})


# Written by trl-bapo 0.2.0 (before Algorithm 1's state became one object) after 3 steps of this plan, with
# rollout_delay=1 (so no rollout snapshot, and a file of 20 KB): the buffers as 0.2.0 saved them.
STATE_0_2_0 = Path(__file__).parent / "data" / "bapo_state_0.2.0.pt"
PLAN_0_2_0 = {f"{t}{n}=": ks for t in range(4) for n, ks in zip("abcd", [[2], [1], [0, 2], [0]])}


def test_a_state_file_of_trl_bapo_0_2_0_loads_and_trains_on(tiny_model_path, tmp_path):
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    shutil.copy(STATE_0_2_0, state_file(str(checkpoint), 0))
    args = make_config(
        tmp_path / "run",
        max_steps=1,
        rollout_delay=1,
        reevaluation_interval=2,
        high_quality_lower_range=[0.25, 0.25],
        high_quality_upper_range=[0.5, 0.5],
    )
    trainer = BAPOTrainer(
        model=tiny_model_path,
        reward_funcs=ScriptedReward(PLAN_0_2_0),
        args=args,
        train_dataset=prompt_dataset(list(PLAN_0_2_0)),
    )
    assert set(read_state(state_file(str(checkpoint), 0))) == set(trainer._bapo.state_dict()) | {
        "version",
        "processes",
        "sharded",
        "settings",
    }, "this version writes the keys 0.2.0 wrote"
    load_state(str(checkpoint), trainer._bapo, trainer.accelerator, trainer.model, sharded=False, allow_missing=False)
    status = trainer.bapo_status
    assert (status.rollout_step, status.rollouts, status.r_tot) == (3, 64, 0.1875)
    assert status.difficult_prompts == ("0d=", "1d=", "2c=", "2d=")
    assert [(g.step, g.accuracy, g.prompt) for g in status.high_quality_groups] == [
        (1, 0.5, "0a="),
        (1, 0.25, "0b="),
        (2, 0.5, "1a="),
        (2, 0.25, "1b="),
        (3, 0.5, "2a="),
        (3, 0.25, "2b="),
    ]
    trainer.train()  # the loaded state goes on: step t = 4 re-evaluates B_bad and replays B_high's groups
    log = bapo_logs(trainer)[-1]
    assert trainer.bapo_status.rollout_step == 4 and log["bapo/reevaluated"] == 4 and log["bapo/x3"] > 0


@pytest.mark.parametrize("split", [dict(steps_per_generation=4), dict(num_iterations=2)], ids=["spg4", "iter2"])
def test_a_checkpoint_inside_a_rollout_step_resumes_that_step(tiny_model_path, tmp_path, split):
    """Two optimizer steps per rollout step, a checkpoint between them: the resumed run trains the rest of the
    assembled batch and generates nothing again (found by review: it scored 8 prompts twice and dropped X1-X3)."""
    settings = dict(max_steps=6, **split)
    straight_reward = _reward(tiny_model_path)
    straight = _trainer(tmp_path / "straight", straight_reward, **settings)
    straight.train()

    reward = _reward(tiny_model_path)
    first = _trainer(tmp_path / "split", reward, save_strategy="steps", save_steps=1, **settings)
    first.add_callback(StopAt(3))
    first.train()
    assert first._step % (first.args.steps_per_generation * first.num_iterations) != 0, "stopped inside a step"
    resumed = _trainer(tmp_path / "split", reward, save_strategy="steps", save_steps=1, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-3"))

    assert reward.times_scored == straight_reward.times_scored
    expected, actual = _state(straight), _state(resumed)
    assert actual["counters"] == expected["counters"]
    assert (actual["difficult"], actual["high_quality"]) == (expected["difficult"], expected["high_quality"])
    for name in expected["weights"]:
        torch.testing.assert_close(actual["weights"][name], expected["weights"][name], atol=0, rtol=0, msg=name)


def test_the_correctness_decision_is_restored_on_resume(tiny_model_path, tmp_path):
    """The only reward scores 2 before global step 2 (outside [0, 1]: no correctness, buffers off) and 0/1 after. A
    resumed run that decided afresh would take the 0/1 values for correctness and fill the buffers; it must go on
    with the decision of the run it continues."""

    def shifting_reward(completions, trainer_state, **kwargs):
        if trainer_state.global_step < 2:
            return [2.0] * len(completions)
        return [float(i % 2) for i in range(len(completions))]

    def run(output_dir, **overrides):
        args = make_config(output_dir, **{**SETTINGS, "max_steps": 4, **overrides})
        return BAPOTrainer(tiny_model_path, shifting_reward, args, train_dataset=prompt_dataset(list(PLAN)))

    straight = run(tmp_path / "straight")
    straight.train()
    first = run(tmp_path / "split", save_strategy="steps", save_steps=2)
    first.add_callback(StopAt(2))
    first.train()
    resumed = run(tmp_path / "split", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    assert straight.bapo_status.correctness.startswith("none")
    assert resumed.bapo_status.correctness == straight.bapo_status.correctness
    assert resumed.bapo_status == straight.bapo_status


@pytest.mark.parametrize(
    "stop, then, now, message",
    [
        # Found by review: the same product of 4 micro-steps, so the old check let it through, and the resumed step
        # trained two micro-batches twice and two never.
        (
            1,
            dict(steps_per_generation=4),
            dict(steps_per_generation=2, num_iterations=2, per_device_train_batch_size=16),
            r"inside a rollout step .*steps_per_generation 4 then, 2 now, num_iterations 1 then, 2 now",
        ),
        # Found by review: an IndexError inside the step.
        (
            3,
            dict(steps_per_generation=4, per_device_train_batch_size=4),
            dict(steps_per_generation=4, per_device_train_batch_size=4, gradient_accumulation_steps=1),
            r"inside a rollout step .*gradient_accumulation_steps 2 then, 1 now",
        ),
        # Found by review: at the end of a rollout step, transformers then skipped 2 batches of the data, not 4, and
        # the first rollout batch's prompts were scored again.
        (
            2,
            dict(steps_per_generation=4, per_device_train_batch_size=4),
            dict(steps_per_generation=4, per_device_train_batch_size=4, gradient_accumulation_steps=1),
            r"skips global_step x gradient_accumulation_steps = 2 batches .*after 1 rollout steps of 4",
        ),
    ],
    ids=["same-product", "accumulation-inside", "accumulation-at-the-end"],
)
def test_a_resume_under_another_cut_of_a_rollout_step_is_refused(tiny_model_path, tmp_path, stop, then, now, message):
    """Untrained micro-batches fit only the cut they were made for, and transformers' data skip depends on it."""
    reward = _reward(tiny_model_path)
    first = _trainer(tmp_path / "split", reward, save_strategy="steps", save_steps=1, **then)
    first.add_callback(StopAt(stop))
    first.train()
    resumed = _trainer(tmp_path / "split", reward, **now)
    with pytest.raises(ValueError, match=message):
        resumed.train(resume_from_checkpoint=str(tmp_path / "split" / f"checkpoint-{stop}"))
