"""What a TRL user reads from BAPO without opening its code: the model card, the config's documentation, the
spelling of `kl_reference`, and the read-only status of the buffers after real training."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import GROUP_SIZE, ScriptedReward, make_config, prompt_dataset

from trl_bapo import BAPOConfig, BAPOTrainer
from trl_bapo.buffers import BAPOStatus, StoredGroup

PROMPTS = ["1+1=", "2+2=", "3+3=", "4+4="]
# Per prompt, how many of the 4 completions are correct each time it is scored: "1+1=" stays unsolved (B_bad),
# "2+2=" is half right (B_high, between c2 and c3, and X1), the others are solved.
PLAN = {"1+1=": [0], "2+2=": [2], "3+3=": [4], "4+4=": [4]}


def trained(tiny_model_path, tmp_path, **overrides) -> BAPOTrainer:
    args = make_config(
        tmp_path,
        max_steps=2,
        rollout_delay=2,
        reevaluation_interval=5,
        high_quality_lower_range=[0.25, 0.5],
        high_quality_upper_range=[0.5, 0.75],
        **overrides,
    )
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(PLAN), args=args, train_dataset=prompt_dataset(PROMPTS)
    )
    trainer.train()
    return trainer


def test_model_card_cites_bapo(tiny_model_path, tmp_path):
    trainer = trained(tiny_model_path, tmp_path)
    trainer.create_model_card(model_name="tiny-bapo")
    card = (tmp_path / "README.md").read_text()
    assert "2602.20722" in card and "Buffer Matters" in card and "@article{wan2026buffer" in card
    assert "DeepSeekMath" not in card
    for tag in ("trl", "grpo", "bapo"):
        assert f"- {tag}\n" in card


def test_status_shows_buffers_and_thresholds_as_a_copy(tiny_model_path, tmp_path):
    trainer = trained(tiny_model_path, tmp_path)
    status = trainer.bapo_status
    assert isinstance(status, BAPOStatus)
    assert status.rollout_step == 2 and status.rollout_policy_step == 2  # v = 2: alpha taken at t = 1, then 2
    assert status.difficult_prompts == ("1+1=",)
    assert {group.prompt for group in status.high_quality_groups} == {"2+2="}
    assert all(isinstance(group, StoredGroup) and group.accuracy == 0.5 for group in status.high_quality_groups)
    assert status.rollouts == 2 * len(PROMPTS) * GROUP_SIZE
    # r_tot is the share of correct fresh completions: (0 + 2 + 4 + 4) / 16 at both steps.
    assert status.r_tot == pytest.approx(10 / 16)
    assert (status.c2, status.c3) == pytest.approx((10 / 16 * 0.25 + 0.25, 10 / 16 * 0.25 + 0.5))  # eq. 8
    assert status.c1 == trainer.args.difficult_threshold
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.c1 = 0.5
    assert trainer.bapo_status == status


def test_config_docstring_documents_every_bapo_field():
    doc = BAPOConfig.__doc__
    assert "Parameters:" in doc
    own = [
        f
        for f in dataclasses.fields(BAPOConfig)
        if f.name not in {g.name for g in dataclasses.fields(BAPOConfig.__mro__[1])}
    ]
    for field in own:
        assert f"        {field.name} (`" in doc, field.name
    assert "rollout_delay (`int`, *optional*, defaults to `5`):" in doc
    assert "v in the paper" in doc


def test_kl_reference_accepts_the_british_spelling(tmp_path):
    assert make_config(tmp_path, kl_reference="behaviour").kl_reference == "behavior"
    with pytest.raises(ValueError, match="kl_reference must be one of"):
        make_config(tmp_path, kl_reference="behaviours")
