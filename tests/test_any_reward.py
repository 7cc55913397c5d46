"""Rewards a GRPOTrainer user has, through `trainer.train()` on the tiny model with BAPO's defaults: a length reward,
a reward model, TRL's accuracy reward beside a format reward or a length penalty, a partial credit, an accuracy
reward that scores nothing at first, a reward that leaves [0, 1]; and which reward says a completion is right,
decided from the rewards' names and never from their first values (`trl_bapo.scoring.Correctness`)."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import GROUP_SIZE, ScriptedReward, bapo_logs, make_config, parameters, prompt_dataset
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2ForSequenceClassification
from trl.rewards import accuracy_reward, get_soft_overlong_punishment

from trl_bapo import BAPOTrainer
from trl_bapo.builtin.tiny import build_tokenizer, text_config
from trl_bapo.scoring import TRL_CORRECTNESS, TRL_NEVER_CORRECTNESS, Correctness

# Per prompt, how many of its 4 completions the accuracy reward calls right, the n-th time it is scored: "a" prompts
# start at 0/4 and are partly solved when re-evaluated (B_bad, then X2); "b" are mixed, "c" solved.
PLAN = {f"{t}{name}=": ks for t in range(6) for name, ks in zip("abcd", [[0, 2], [2], [4], [1]])}
SAID = "BAPO's correctness"


def length_reward(completions, **kwargs):
    """TRL's own example of a reward: the completion's length, on no particular scale."""
    return [float(len(completion)) for completion in completions]


def think_format_reward(completions, **kwargs):
    """TRL's format reward as a model that mostly follows the format scores it: 0/1, three completions in four."""
    return [float(i % GROUP_SIZE != GROUP_SIZE - 1) for i in range(len(completions))]


def length_penalty(completions, **kwargs):
    """A user's own length penalty: 0 while completions are short, as they are at the start of a run."""
    return [-max(0.0, len(completion) - 64.0) for completion in completions]


def changed(before: dict, after: dict) -> int:
    return sum(not torch.equal(before[name], after[name]) for name in before)


def train(model, reward_funcs, output_dir, dataset, **overrides) -> BAPOTrainer:
    args = make_config(output_dir, **overrides)
    trainer = BAPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset)
    trainer.train()
    return trainer


def math_problems(solutions: list[str]) -> Dataset:
    """Conversational prompts with a `solution` column, as TRL's accuracy reward reads them. The tiny model never
    writes a LaTeX answer, so every completion of a parseable solution scores 0; an unparseable one scores None."""
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"{i}+{i}="}], "solution": s} for i, s in enumerate(solutions)]
    )


def said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(SAID)]


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
    assert trainer.bapo_status.correctness.startswith("none (`length_reward`, the only reward function, scored")
    warnings = said(caplog)
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


def test_trl_accuracy_reward_listed_after_a_format_reward_of_equal_weight_decides(tiny_model_path, tmp_path, caplog):
    """Both rewards are 0/1 at equal weights, the format reward first: the first values cannot tell them apart, the
    names can. Read as correctness, the format reward would put every group at 3/4 and none in B_bad."""
    with caplog.at_level(logging.INFO):
        trainer = train(
            tiny_model_path,
            [think_format_reward, accuracy_reward],
            tmp_path,
            math_problems([f"${2 * i}$" for i in range(8)]),
            max_steps=2,
        )
    logs = bapo_logs(trainer)
    # No completion is right: every prompt of the first step enters B_bad, though the format reward splits the groups.
    assert logs[0]["bapo/difficult_buffer"] == 4 and logs[0]["bapo/x1"] > 0, logs[0]
    assert trainer.bapo_status.r_tot == 0
    assert trainer.bapo_status.correctness == "reward `accuracy_reward` >= 1 (TRL's accuracy reward, known by name)"
    assert said(caplog) == [f"{SAID}: {trainer.bapo_status.correctness}."]


@pytest.mark.parametrize("penalty", ["trl", "own"])
def test_a_length_penalty_listed_first_is_not_taken_for_accuracy(tiny_model_path, tmp_path, caplog, penalty):
    """A length penalty scores 0 on a run's first, short completions, as a 0/1 reward would. TRL's own is known to
    never say correctness, so the accuracy beside it decides; a user's own leaves two candidates and no way to tell
    them apart, so the buffers stay off, said once, with the setting that turns them on."""
    first = (
        get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4) if penalty == "trl" else length_penalty
    )
    with caplog.at_level(logging.INFO):
        trainer = train(
            tiny_model_path, [first, ScriptedReward(PLAN)], tmp_path, prompt_dataset(list(PLAN)), max_steps=2
        )
    logs = bapo_logs(trainer)
    if penalty == "trl":
        # Only the "a" prompt of the first step is at 0/4; read from the penalty, all four would be.
        assert logs[0]["bapo/difficult_buffer"] == 1, logs[0]
        assert trainer.bapo_status.r_tot > 0
        assert trainer.bapo_status.correctness == (
            "reward `scripted_reward` >= 1 (the only reward function besides `soft_overlong_punishment_reward` "
            "(TRL's overlong penalty); its first scores were in [0, 1])"
        )
        assert said(caplog) == [f"{SAID}: {trainer.bapo_status.correctness}."]
    else:
        assert all(log["bapo/difficult_buffer"] == 0 for log in logs), logs
        assert trainer.bapo_status.r_tot == 0  # no completion was read as right or wrong
        assert trainer.bapo_status.correctness.startswith("none (several reward functions")
        warnings = [r for r in caplog.records if r.getMessage().startswith(SAID)]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        assert all(word in warnings[0].getMessage() for word in ("`length_penalty`", "`scripted_reward`"))
        assert "correctness_reward" in warnings[0].getMessage()


def test_a_partial_credit_that_scores_only_zero_at_first_never_stops_the_run(tiny_model_path, tmp_path):
    """Partial credit {0, 0.5, 1}, all 0 on the first batch: it stays in [0, 1], so it never stops the run, and with
    correctness_threshold 1 only full credit is correct."""
    calls = []

    def partial_credit(completions, **kwargs):
        calls.append(len(completions))
        if len(calls) == 1:
            return [0.0] * len(completions)
        return [[0.0, 0.5, 1.0, 0.5][i % GROUP_SIZE] for i in range(len(completions))]

    trainer = train(
        tiny_model_path, partial_credit, tmp_path, prompt_dataset([f"{i}+1=" for i in range(12)]), max_steps=3
    )
    assert len(calls) == 3 and len(bapo_logs(trainer)) == 3
    # r_tot, over every fresh completion: none of the first 16, then one in four of 32.
    assert trainer.bapo_status.r_tot == pytest.approx(8 / 48)
    assert trainer.bapo_status.correctness == (
        "reward `partial_credit` >= 1 (the only reward function; its first scores were in [0, 1])"
    )


def test_trl_accuracy_reward_that_scores_nothing_at_first_decides_later(tiny_model_path, tmp_path):
    """The first step's solutions do not parse, so TRL's accuracy reward returns None for all of its completions;
    that decides nothing, and the next step's zeros fill B_bad."""
    solutions = ["", "?", "", "?"] + [f"${2 * i}$" for i in range(4, 8)]
    trainer = train(tiny_model_path, accuracy_reward, tmp_path, math_problems(solutions), max_steps=2)
    logs = bapo_logs(trainer)
    assert logs[0]["bapo/difficult_buffer"] == 0 and logs[1]["bapo/difficult_buffer"] == 4, logs
    assert trainer.bapo_status.correctness.startswith("reward `accuracy_reward` >= 1")


def test_a_reward_that_leaves_the_unit_interval_stops_with_a_clear_message(tiny_model_path, tmp_path):
    calls = []

    def graded(completions, **kwargs):
        calls.append(len(completions))
        if len(calls) == 1:  # in [0, 1] at the first step, so it is read against correctness_threshold
            return [float(i % 2) for i in range(len(completions))]
        return [2.0] * len(completions)

    message = (
        r"`graded` now returns values outside \[0, 1\] \(from 2 to 2\).*correctness_reward.*correctness_threshold"
    )
    with pytest.raises(ValueError, match=message):
        train(tiny_model_path, graded, tmp_path, prompt_dataset([f"{i}+1=" for i in range(8)]), max_steps=3)
    assert len(calls) == 2


# ---- the rule, on reward columns as TRL gathers them -----------------------------------------------------------


def scorer(names: list[str], stated: str | None = None, threshold: float = 1.0) -> Correctness:
    trainer = SimpleNamespace(reward_func_names=names, accelerator=SimpleNamespace(is_main_process=True))
    return Correctness(stated, threshold, trainer)


UNKNOWN = st.sampled_from(["correct", "format", "length_penalty", "partial_credit", "judge", "reward-model"])
SCORES = st.one_of(st.sampled_from([0.0, 0.5, 1.0, math.nan]), st.floats(-100, 100, allow_nan=False))
UNIT_SCORES = st.one_of(st.sampled_from([0.0, 0.5, 1.0, math.nan]), st.floats(0, 1))


def batches(width: int, values=SCORES):
    """A few batches of 8 completions, each a row of `width` rewards."""
    return st.lists(st.lists(st.lists(values, min_size=width, max_size=width), min_size=8, max_size=8), max_size=4)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), width=st.integers(2, 4))
def test_several_unknown_rewards_are_never_picked_from_their_values(data, width):
    names = data.draw(st.lists(UNKNOWN, min_size=width, max_size=width))
    shapers = data.draw(st.lists(st.sampled_from(sorted(TRL_NEVER_CORRECTNESS)), max_size=2))
    correctness = scorer(names + shapers)
    for batch in data.draw(batches(len(names + shapers))):
        assert torch.isnan(correctness(torch.tensor(batch))).all()
    assert correctness.description.startswith("none (several reward functions")


@settings(max_examples=60, deadline=None)
@given(data=st.data(), threshold=st.sampled_from([1.0, 0.5, 0.0]))
def test_the_only_reward_inside_the_unit_interval_never_stops_the_run(data, threshold):
    correctness, scored = scorer(["partial_credit"], threshold=threshold), False
    for batch in data.draw(batches(1, UNIT_SCORES)):
        values = torch.tensor(batch)[:, 0]
        correct = correctness(torch.tensor(batch))
        # Until a batch scores something, nothing is decided and no completion is correct or wrong.
        scored = scored or bool((~torch.isnan(values)).any())
        expected = (
            torch.where(torch.isnan(values), values, (values >= threshold).float()) if scored else values * math.nan
        )
        torch.testing.assert_close(correct, expected, equal_nan=True)
    assert correctness.description.startswith("reward `partial_credit`")


@settings(max_examples=60, deadline=None)
@given(data=st.data(), known=st.sampled_from(sorted(TRL_CORRECTNESS)))
def test_one_trl_accuracy_reward_decides_wherever_it_is_listed(data, known):
    others = data.draw(st.lists(st.one_of(UNKNOWN, st.sampled_from(sorted(TRL_NEVER_CORRECTNESS))), max_size=3))
    names = data.draw(st.permutations([known, *others]))
    correctness = scorer(names)
    for batch in data.draw(batches(len(names), UNIT_SCORES)):
        values = torch.tensor(batch)[:, names.index(known)]
        expected = torch.where(torch.isnan(values), values, (values >= 1).float())
        torch.testing.assert_close(correctness(torch.tensor(batch)), expected, equal_nan=True)
    assert correctness.description == f"reward `{known}` >= 1 ({TRL_CORRECTNESS[known]}, known by name)"


@pytest.mark.parametrize(
    "names, stated, expected",
    [
        (["think_format_reward", "accuracy_reward"], None, "reward `accuracy_reward` >= 1 (TRL's accuracy reward"),
        (["accuracy_reward", "reasoning_accuracy_reward"], None, "none (several reward functions"),
        (["format", "accuracy"], "format", "reward `format` >= 1 (correctness_reward)"),
        (["think_format_reward", "cosine_scaled_reward"], None, "none (`think_format_reward` (TRL's format reward)"),
        (["length_reward"], None, "reward `length_reward` >= 1 if its first scores lie in [0, 1], else none"),
    ],
)
def test_the_decision_by_names(names, stated, expected):
    assert scorer(names, stated).description.startswith(expected)


def test_the_decision_is_saved_and_restored(caplog):
    """The only reward decided on its first scores; a resumed run reads correctness as the run it continues did,
    with no first batch to decide again. The trainer's checkpoint code saves and loads these dicts."""
    decided = scorer(["partial_credit"])
    decided(torch.tensor([[math.nan], [0.0]]))
    saved = decided.state_dict()
    assert saved == {"names": ["partial_credit"], "source": "only", "column": 0}

    resumed = scorer(["partial_credit"])
    with caplog.at_level(logging.INFO):
        resumed.load_state_dict(saved)
    assert resumed.description == decided.description
    assert said(caplog)[-1].endswith(f"restored from the checkpoint: {decided.description}.")
    with pytest.raises(ValueError, match="now returns values outside"):
        resumed(torch.tensor([[3.0], [0.0]]))  # its scale was decided, even though this is the resume's first batch

    off = scorer(["length_reward"])
    off(torch.tensor([[3.0], [1.0]]))
    fresh = scorer(["length_reward"])
    fresh.load_state_dict(off.state_dict())
    assert torch.isnan(fresh(torch.tensor([[0.0], [1.0]]))).all()  # stays off, though these values are in [0, 1]

    # An old checkpoint without a decision: decided afresh, as in a new run.
    afresh = scorer(["partial_credit"])
    afresh.load_state_dict(None)
    assert afresh.state_dict()["source"] is None

    # A correctness_reward stated now replaces the checkpoint's decision: the fix the warning asks for.
    several = scorer(["format", "accuracy"]).state_dict()
    stated = scorer(["format", "accuracy"], stated="accuracy")
    with caplog.at_level(logging.WARNING):
        stated.load_state_dict(several)
    assert stated.description == "reward `accuracy` >= 1 (correctness_reward)"
    assert "replaces the checkpoint's decision" in said(caplog)[-1]


@pytest.mark.parametrize(
    "saved",
    [
        {"names": ["format", "accuracy"], "source": "only", "column": 1},  # a reward function added since
        {"names": ["partial_credit"], "source": "only", "column": 3},  # a column past the reward functions
    ],
)
def test_a_saved_decision_that_no_longer_fits_is_refused(saved):
    names = r"\['format', 'accuracy'\]" if len(saved["names"]) == 2 else r"\['partial_credit'\]"
    with pytest.raises(ValueError, match=rf"reward functions {names}, but this trainer's .* \['partial_credit'\]"):
        scorer(["partial_credit"]).load_state_dict(saved)
