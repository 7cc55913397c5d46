"""Rewards a GRPOTrainer user has, through `trainer.train()` on the tiny model with BAPO's defaults: a length reward,
a reward model, an accuracy reward beside a weighted format reward, and a reward that changes scale mid-run."""

import logging

import pytest
import torch
from conftest import ScriptedReward, bapo_logs, make_config, parameters, prompt_dataset
from transformers import Qwen2ForSequenceClassification

from trl_bapo import BAPOTrainer
from trl_bapo.builtin.tiny import build_tokenizer, text_config
from trl_bapo.scoring import Correctness

# Per prompt, how many of its 4 completions the accuracy reward calls right, the n-th time it is scored: "a" prompts
# start at 0/4 and are partly solved when re-evaluated (B_bad, then X2); "b" are mixed, "c" solved.
PLAN = {f"{t}{name}=": ks for t in range(6) for name, ks in zip("abcd", [[0, 2], [2], [4], [1]])}


def length_reward(completions, **kwargs):
    """TRL's own example of a reward: the completion's length, on no particular scale."""
    return [float(len(completion)) for completion in completions]


def format_reward(completions, **kwargs):
    """0/1: the completion holds a digit (a format bonus, as open recipes add beside accuracy)."""
    return [float(any(character.isdigit() for character in completion)) for completion in completions]


def changed(before: dict, after: dict) -> int:
    return sum(not torch.equal(before[name], after[name]) for name in before)


def train(model, reward_funcs, output_dir, prompts, **overrides) -> BAPOTrainer:
    args = make_config(output_dir, **overrides)
    trainer = BAPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=prompt_dataset(prompts))
    trainer.train()
    return trainer


def test_a_length_reward_trains_with_the_defaults(tiny_model_path, tmp_path, caplog):
    trainer = BAPOTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=make_config(tmp_path, max_steps=3),
        train_dataset=prompt_dataset([f"{i}+{i}=" for i in range(12)]),
    )
    before = parameters(trainer.model)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    logs = bapo_logs(trainer)
    # X1 keeps the groups whose lengths differ, on the length's own scale; no group is read as an accuracy.
    assert all(log["bapo/x1"] > 0 for log in logs), logs
    assert changed(before, parameters(trainer.model)) > 0
    assert all(log["bapo/difficult_buffer"] == 0 and log["bapo/x3"] == 0 for log in logs)
    assert trainer.bapo_status.correctness.startswith("none")
    warnings = [r.getMessage() for r in caplog.records if "no correctness signal" in r.getMessage()]
    assert len(warnings) == 1 and "correctness_reward" in warnings[0] and "correctness_threshold" in warnings[0]


def test_a_reward_model_trains_with_the_defaults(tiny_model_path, tmp_path):
    """A sequence classifier built here, passed by path as TRL users pass a reward model."""
    tokenizer = build_tokenizer()
    torch.manual_seed(1)
    config = text_config(tokenizer, hidden_size=64, layers=1)
    config.num_labels = 1
    reward_model = Qwen2ForSequenceClassification(config)
    reward_model.save_pretrained(tmp_path / "reward-model")
    tokenizer.save_pretrained(tmp_path / "reward-model")
    trainer = BAPOTrainer(
        model=tiny_model_path,
        reward_funcs=str(tmp_path / "reward-model"),
        args=make_config(tmp_path / "run", max_steps=3),
        train_dataset=prompt_dataset([f"{i}-{i}=" for i in range(12)]),
    )
    before = parameters(trainer.model)
    trainer.train()
    assert all(log["bapo/x1"] > 0 for log in bapo_logs(trainer))
    assert changed(before, parameters(trainer.model)) > 0


def test_accuracy_beside_a_weighted_format_reward_fills_the_difficulty_buffers(tiny_model_path, tmp_path, caplog):
    accuracy = ScriptedReward(PLAN)
    accuracy.__name__ = "accuracy_reward"
    with caplog.at_level(logging.WARNING):
        trainer = BAPOTrainer(
            model=tiny_model_path,
            reward_funcs=[accuracy, format_reward],
            args=make_config(
                tmp_path, max_steps=4, rollout_delay=2, reevaluation_interval=2, reward_weights=[1.0, 0.5]
            ),
            train_dataset=prompt_dataset(list(PLAN)),
        )
        before = parameters(trainer.model)
        trainer.train()
    logs = bapo_logs(trainer)
    # Both rewards are 0/1: the one with the larger weight is the correctness signal, said once at the first step.
    assert trainer.bapo_status.correctness == "reward `accuracy_reward` (its values are 0/1)"
    said = [r.getMessage() for r in caplog.records if "BAPO's correctness" in r.getMessage()]
    assert len(said) == 1 and "accuracy_reward" in said[0]
    # The format bonus does not shift accuracies: the prompts at 0/4 enter B_bad, and come back in X2.
    assert logs[0]["bapo/difficult_buffer"] == 1, logs[0]
    assert any(log["bapo/x2"] > 0 for log in logs), [log["bapo/x2"] for log in logs]
    # r_tot is the share of correct completions, not the mean of the weighted sum.
    assert 0 < trainer.bapo_status.r_tot <= 1
    assert changed(before, parameters(trainer.model)) > 0


def test_a_correctness_reward_that_changes_scale_stops_with_a_clear_message(tiny_model_path, tmp_path):
    calls = []

    def accuracy_reward(completions, **kwargs):
        calls.append(len(completions))
        if len(calls) == 1:  # 0/1 at the first step, so it is taken as the correctness signal
            return [float(i % 2) for i in range(len(completions))]
        return [0.5] * len(completions)

    message = r"accuracy_reward.*outside 0 or 1.*correctness_reward.*correctness_threshold"
    with pytest.raises(ValueError, match=message):
        train(tiny_model_path, accuracy_reward, tmp_path, [f"{i}+1=" for i in range(8)], max_steps=3)
    assert len(calls) == 2


class Scores:
    """Reward columns as TRL gathers them, for the rule's unit tests."""

    reward_func_names = ["accuracy", "format"]
    reward_weights = torch.tensor([1.0, 0.5])

    class accelerator:
        is_main_process = False


@pytest.mark.parametrize(
    "columns, expected",
    [
        ([[1.0, 0.0], [0.0, 1.0]], "reward `accuracy`"),  # both 0/1: the larger weight
        ([[0.3, 1.0], [0.7, 0.0]], "reward `format`"),  # the 0/1 one, beside a graded one
        ([[0.2, 0.4], [0.1, 0.2]], "the weighted sum"),  # graded, summing inside [0, 1]
        ([[3.0, 0.4], [1.0, 0.2]], "none"),  # graded, summing outside it
        ([[float("nan"), 1.0], [1.0, float("nan")]], "reward `accuracy`"),  # None (NaN) scores are left out
    ],
)
def test_the_correctness_rule(columns, expected):
    correctness = Correctness(None, 1.0, Scores)
    correct = correctness(torch.tensor(columns))
    assert correctness.description.startswith(expected)
    # Without a signal every completion's correctness is NaN, so no group enters B_bad or B_high.
    assert correct.shape == (2,) and bool(torch.isnan(correct).all()) == (expected == "none")
