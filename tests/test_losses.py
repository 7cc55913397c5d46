"""Losses for stale data: adaptive clipping (Balanced Policy Optimization) and REC / AsymRE / OPMD.

Through `trainer.train()` on the tiny model with a stale rollout policy and replay, every micro-batch's loss is
recomputed by hand from a forward pass of our own and compared with what the trainer returned.
"""

import math

import pytest
import torch
from conftest import ScriptedReward, bapo_logs, batch_completion_logps, make_config, parameters, prompt_dataset
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from trl_bapo import BAPOConfig, BAPOTrainer
from trl_bapo.builtin.tiny import build_tokenizer
from trl_bapo.clipping import adaptive_clip_bounds
from trl_bapo.losses import LOSSES as LOSS_TABLE
from trl_bapo.losses import Loss

PLAN = {f"{t}{name}=": ks for t in range(8) for name, ks in zip("abcd", [[2], [3], [0, 2], [1]])}
START, STEP, MAXIMUM, TARGET = (0.6, 1.2), 0.05, (0.8, 2.0), 1.0


def reference_bounds(ratio, advantages, mask):
    """The rule written out: candidate lows from start to max, then candidate highs, first that balances wins."""

    def balance(low, high):
        totals = [0.0, 0.0]
        for r, a, m in zip(
            ratio.flatten().tolist(), advantages.expand_as(ratio).flatten().tolist(), mask.flatten().tolist()
        ):
            value = m * a * (min(r, high) if a >= 0 else max(r, low))
            totals[0 if value > 0 else 1] += abs(value)
        return totals

    lows = [round(START[0] + k * STEP, 10) for k in range(5)]
    highs = [round(START[1] + k * STEP, 10) for k in range(17)]
    for low in lows:
        positive, negative = balance(low, START[1])
        if positive >= TARGET * negative:
            return low, START[1]
    for high in highs[1:]:
        positive, negative = balance(lows[-1], high)
        if positive >= TARGET * negative:
            return lows[-1], high
    return lows[-1], highs[-1]


def test_adaptive_bounds_on_a_scripted_batch():
    def bounds(positive_ratios, negative_ratios, all_reduce=lambda sums: sums):
        ratio = torch.tensor([positive_ratios + negative_ratios])
        advantages = torch.tensor([[1.0] * len(positive_ratios) + [-1.0] * len(negative_ratios)])
        return adaptive_clip_bounds(
            ratio, advantages, torch.ones_like(ratio), START, STEP, MAXIMUM, TARGET, all_reduce
        )

    # Balanced at the start: nothing moves.
    assert (bounds([1.0, 1.0], [1.0]).low, bounds([1.0, 1.0], [1.0]).high) == START
    # Positive 2h + 1, negative l + 2.95: low climbs to 0.8 (negative 3.75), then high until 2h + 1 >= 3.75: 1.4.
    chosen = bounds([1.5, 1.5, 1.0], [0.5, 1.0, 1.95])
    assert chosen.low == pytest.approx(0.8) and chosen.high == pytest.approx(1.4)
    assert chosen.positive == pytest.approx(3.8) and chosen.negative == pytest.approx(3.75)
    # Never balanced: both bounds end at their maximum.
    chosen = bounds([1.5, 1.0], [0.5, 1.0, 2.0])
    assert (chosen.low, chosen.high) == pytest.approx(MAXIMUM) and chosen.negative == pytest.approx(3.8)
    # Sums over processes (here two identical ones) choose the same bounds.
    doubled = bounds([1.5, 1.5, 1.0], [0.5, 1.0, 1.95], all_reduce=lambda sums: 2 * sums)
    assert (doubled.low, doubled.high) == pytest.approx((0.8, 1.4)) and doubled.negative == pytest.approx(7.5)


def moe_aux_loss(model, inputs) -> torch.Tensor:
    """The load-balancing loss of a Mixture-of-Experts model on a micro-batch, from a forward pass of our own."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention, output_router_logits=True).aux_loss


def trainer_checking_each_loss(model_path, output_dir, expected_per_token, extra_loss=None, **overrides):
    """A trainer whose every micro-batch loss is compared with the token mean of `expected_per_token`, plus
    `extra_loss(trainer, inputs)` when given."""
    args = make_config(
        output_dir,
        max_steps=6,
        rollout_delay=3,
        reevaluation_interval=3,
        learning_rate=5e-2,
        bf16=False,
        high_quality_lower_range=[0.25, 0.25],
        high_quality_upper_range=[0.5, 0.5],
        **overrides,
    )
    trainer = BAPOTrainer(
        model=model_path, reward_funcs=ScriptedReward(PLAN), args=args, train_dataset=prompt_dataset(list(PLAN))
    )
    checked = {"losses": 0, "largest_log_ratio": 0.0, "bounds": set()}
    compute_loss = trainer.compute_loss

    def checking_compute_loss(model, inputs, *a, **k):
        current = batch_completion_logps(trainer.model, inputs)
        old = inputs.get("old_per_token_logps", current)
        mask = inputs["completion_mask"].float()
        advantages = inputs["advantages"].unsqueeze(1)
        checked["largest_log_ratio"] = max(checked["largest_log_ratio"], float(((current - old) * mask).abs().max()))
        loss = compute_loss(model, inputs, *a, **k)
        per_token = expected_per_token(trainer, current, old, advantages, mask)
        expected = (per_token * mask).sum() / mask.sum().clamp(min=1)
        if extra_loss is not None:
            expected = expected + extra_loss(trainer, inputs)
        expected = expected / args.gradient_accumulation_steps
        torch.testing.assert_close(loss.detach(), expected * inputs["bapo_loss_scale"], atol=1e-5, rtol=1e-4)
        checked["losses"] += 1
        return loss

    trainer.compute_loss = checking_compute_loss
    return trainer, checked


def test_adaptive_clipping_chooses_bounds_by_the_rule_and_trains_with_them(tiny_model_path, tmp_path):
    def clipped_surrogate(trainer, current, old, advantages, mask):
        ratio = torch.exp(current - old)
        low, high = reference_bounds(ratio, advantages, mask)
        metrics = trainer._metrics["train"]
        assert (metrics["bapo/clip_low"][-1], metrics["bapo/clip_high"][-1]) == pytest.approx((low, high))
        checked["bounds"].add((low, high))
        dual = torch.clamp(ratio, max=3.0)  # the dual clip, c = 3
        return -torch.min(dual * advantages, torch.clamp(ratio, low, high) * advantages)

    trainer, checked = trainer_checking_each_loss(
        tiny_model_path, tmp_path, clipped_surrogate, loss_type="bnpo", adaptive_clipping=True
    )
    trainer.train()
    assert checked["losses"] == 12 and checked["largest_log_ratio"] > 0.05
    assert len(checked["bounds"]) > 1, f"the bounds never moved: {checked['bounds']}"
    logs = bapo_logs(trainer)
    assert all(START[0] <= log["bapo/clip_low"] <= MAXIMUM[0] + 1e-9 for log in logs)
    assert all(log["bapo/clip_positive"] >= 0 and log["bapo/clip_negative"] >= 0 for log in logs)
    assert (trainer.epsilon_low, trainer.epsilon_high, trainer.args.delta) == (0.2, 0.2, None), "bounds leaked"


def rec(variant):
    def expected(trainer, current, old, advantages, mask):
        ratio = torch.exp(current - old)
        positive, negative = advantages >= 0, advantages <= 0
        band = (ratio >= 0.8) & (ratio <= 1.2)
        keep = {
            "oneside": (positive & (ratio <= 1.2)) | (negative & (ratio >= 0.8)),
            "twoside": band,
            "ring": band | (positive & (ratio <= 0.4)) | (negative & (ratio >= 3.0)),
        }[variant.split("-")[0]]
        weight = advantages * ratio if variant.endswith("-is") else advantages
        return -weight * current * keep

    return expected


def k3(old, current):
    """TRL's estimate of KL(pi || behavior) per token."""
    return torch.exp(old - current) - (old - current) - 1


LOSSES = {
    "rec-oneside-nois": (dict(loss_type="rec", rec_variant="oneside-nois"), rec("oneside-nois")),
    "rec-twoside-is": (dict(loss_type="rec", rec_variant="twoside-is"), rec("twoside-is")),
    "rec-ring-nois": (dict(loss_type="rec", rec_variant="ring-nois"), rec("ring-nois")),
    "asymre": (dict(loss_type="asymre"), lambda trainer, current, old, a, mask: -(a + 0.1) * current),
    "opmd": (dict(loss_type="opmd"), lambda trainer, current, old, a, mask: -a * current + 0.1 * (current - old) ** 2),
    # TRL's bias-corrected KL to the behavior policy: the k3 estimate weighed by the ratio to that policy.
    "opmd-bias-corrected-kl": (
        dict(loss_type="opmd", beta=0.05, use_bias_correction_kl=True),
        lambda trainer, current, old, a, mask: (
            -a * current + 0.1 * (current - old) ** 2 + 0.05 * k3(old, current) * torch.exp(current - old)
        ),
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_off_policy_loss_equals_its_definition(name, tiny_model_path, tmp_path):
    overrides, expected = LOSSES[name]
    trainer, checked = trainer_checking_each_loss(
        tiny_model_path, tmp_path, expected, scale_rewards="none", **overrides
    )
    trainer.train()
    assert checked["losses"] == 12 and checked["largest_log_ratio"] > 0.05, checked
    assert sum(log["bapo/x3"] for log in bapo_logs(trainer)) > 0, "no replayed group was trained on"


def build_tiny_moe_model(path) -> str:
    """A tiny Qwen3-MoE model (4 experts, 2 per token) with the tiny model's tokenizer."""
    tokenizer = build_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.5,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_off_policy_loss_adds_the_moe_auxiliary_loss(tmp_path):
    """As TRL adds it to its own losses: router_aux_loss_coef times the load-balancing loss of the same forward."""
    model_path = build_tiny_moe_model(tmp_path / "moe")
    trainer, checked = trainer_checking_each_loss(
        model_path,
        tmp_path / "out",
        LOSSES["opmd"][1],
        extra_loss=lambda trainer, inputs: 0.5 * moe_aux_loss(trainer.model, inputs),
        scale_rewards="none",
        **LOSSES["opmd"][0],
    )
    trainer.train()
    assert checked["losses"] == 12, checked
    assert all(log["aux_loss"] > 0 for log in bapo_logs(trainer))


@pytest.mark.parametrize("loss_type", ["rec", "asymre", "opmd"])
def test_off_policy_loss_trains_with_the_paper_defaults(loss_type, tiny_model_path, tmp_path):
    """v = 5, m = 5, both replays on, the behavior-policy KL: finite losses and a moving policy."""
    args = make_config(tmp_path, max_steps=6, learning_rate=1e-2, beta=0.001, loss_type=loss_type)
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(PLAN), args=args, train_dataset=prompt_dataset(list(PLAN))
    )
    before = parameters(trainer.model)
    trainer.train()
    logs = bapo_logs(trainer)
    assert all(math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"]) for log in logs)
    assert all(math.isfinite(log["entropy"]) for log in logs) and "kl" in logs[-1]
    after = parameters(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(loss_type="rec", rec_variant="oneside"), "rec_variant"),
        (dict(loss_type="opmd", opmd_tau=-1.0), "opmd_tau"),
        (dict(loss_type="asymre", adaptive_clipping=True), "adaptive_clipping applies to TRL's own loss types"),
        (dict(loss_type="rec", top_entropy_quantile=0.5), "top_entropy_quantile"),
        (dict(loss_type="cispo", adaptive_clipping=True), "adaptive_clipping sets the bounds"),
        (dict(loss_type="bnpo", adaptive_clipping=True, delta=2.0), "leave delta unset"),
        (dict(loss_type="bnpo", adaptive_clipping=True, adaptive_clip_max=[0.5, 2.0]), "adaptive_clip_start"),
    ],
)
def test_loss_options_fail_clearly(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


def test_a_loss_added_to_the_table_later_is_checked_and_trained(tiny_model_path, tmp_path, monkeypatch):
    """`trl_bapo.losses.LOSSES` is read when a config is built and when the trainer computes a loss, not copied at
    import: an entry added afterwards gets the checks of its kind and trains through `train()`."""
    shapes = []

    def plain_reinforce(logps, old_logps, advantages, args):
        shapes.append(tuple(logps.shape))
        return -advantages * logps

    monkeypatch.setitem(LOSS_TABLE, "plain_reinforce", Loss("token", per_token=plain_reinforce))
    with pytest.raises(ValueError, match="delta"):  # a token-level REINFORCE loss has no clipped ratio to bound
        make_config(tmp_path, loss_type="plain_reinforce", delta=2.0)
    with pytest.raises(ValueError, match="adaptive_clipping"):
        make_config(tmp_path, loss_type="plain_reinforce", adaptive_clipping=True)
    args = make_config(tmp_path, loss_type="plain_reinforce", max_steps=2, rollout_delay=2)
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(PLAN), args=args, train_dataset=prompt_dataset(list(PLAN))
    )
    trainer.train()
    assert len(shapes) == 2 * args.gradient_accumulation_steps
    assert not math.isnan(trainer.state.log_history[-1]["train_loss"])
