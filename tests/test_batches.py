"""Variable-size batches: the empty batch, unscorable completions, and loss normalisation across micro-batches."""

import math

import pytest
import torch
from conftest import GROUP_SIZE, ScriptedReward, bapo_logs, make_config, parameters, prompt_dataset

from trl_bapo import BAPOTrainer
from trl_bapo.batch import concat_batches, split_micro_batches, unmeasured_rows
from trl_bapo.builtin.tiny import load_tiny_model
from trl_bapo.losses import LOSSES


def test_empty_batch_trains_on_nothing(tiny_model_path, tmp_path):
    """All groups homogeneous, nothing to replay: every step is skipped, weights stay put, no NaN."""
    prompts = [f"{i}=" for i in range(16)]
    # With weight decay, an optimizer step that ran on the zero gradient would move the weights.
    args = make_config(tmp_path, max_steps=3, reevaluation_interval=1, beta=0.01, learning_rate=1e-2, weight_decay=0.1)
    trainer = BAPOTrainer(
        model=tiny_model_path,
        reward_funcs=ScriptedReward({}, default=0),
        args=args,
        train_dataset=prompt_dataset(prompts),
    )
    before = parameters(trainer.model)
    trainer.train()
    logs = bapo_logs(trainer)
    assert [log["bapo/skipped"] for log in logs] == [1.0, 1.0, 1.0]
    assert all(log["bapo/x1"] + log["bapo/x2"] + log["bapo/x3"] == 0 for log in logs)
    # Every prompt is difficult: B_bad (capacity 4) is re-evaluated every step and stays unsolved.
    assert [log["bapo/reevaluated"] for log in logs] == [4, 4, 4]
    assert [log["bapo/difficult_buffer"] for log in logs] == [4, 4, 4]
    assert all(math.isfinite(log["loss"]) and log["loss"] == 0 for log in logs)
    after = parameters(trainer.model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_unscorable_completions_are_left_out_as_trl_does(tiny_model_path, tmp_path):
    """A completion every reward function returns None for is NaN: out of the group accuracy, zero advantage."""
    scripted = ScriptedReward({f"{t}{name}=": [k] for t in range(3) for name, k in zip("abcd", [2, 0, 4, 1])})

    def reward(prompts, completions, **kwargs):
        rewards = scripted(prompts, completions, **kwargs)
        return [None if i % GROUP_SIZE == GROUP_SIZE - 1 else r for i, r in enumerate(rewards)]

    reward.__name__ = "partly_unscorable"
    args = make_config(tmp_path, max_steps=3, use_difficult_replay=True, use_high_quality_replay=False)
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(list(scripted.plan))
    )
    trainer.train()
    logs = bapo_logs(trainer)
    # The fourth completion of each group is unscorable: a is 2/3 and d is 1/3 (mixed), b is 0/3, c is 3/3.
    assert [log["bapo/x1"] for log in logs] == [2, 2, 2]
    assert [log["bapo/difficult_buffer"] for log in logs] == [1, 2, 3]
    assert all(math.isfinite(log["loss"]) for log in logs)
    assert all(log["bapo/r_tot"] == pytest.approx((2 + 0 + 3 + 1) / 12) for log in logs)


def _one_step_weights(tiny_model_path, tmp_path, loss_type, per_device, accumulation):
    # 6 prompts per rollout; the range filter keeps 5 groups (20 rows), which no micro-batch count here divides.
    plan = {f"{name}=": [k] for name, k in zip("abcdef", [2, 2, 1, 3, 0, 2])}
    args = make_config(
        tmp_path / f"{loss_type}-{accumulation}",
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        loss_type=loss_type,
        optim="sgd",  # plain SGD: the update is proportional to the gradient, so its scale is visible
        learning_rate=0.5,
        max_grad_norm=0.0,
        use_difficult_replay=False,
        use_high_quality_replay=False,
    )
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(plan), args=args, train_dataset=prompt_dataset(list(plan))
    )
    trainer.train()
    assert bapo_logs(trainer)[0]["bapo/x1"] == 5
    return parameters(trainer.model)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
def test_uneven_micro_batches_give_the_full_batch_gradient(tiny_model_path, tmp_path, loss_type):
    """20 rows in 1, 3 (7/7/6) or 8 (3,3,3,3,2,2,2,2) micro-batches, and in 24 micro-batches, 4 of them
    empty, must all take the same optimizer step.

    Plain GRPOTrainer, cutting one batch into 1, 2 or 3 even micro-batches, already differs by up to 0.35% of
    the update on this model (batch-size-dependent float kernels), so updates are compared at 1%; weighting
    the micro-batches of 7/7/6 or 3/2 rows as equals is off by far more.
    """
    initial = parameters(load_tiny_model(tiny_model_path))
    reference = _one_step_weights(tiny_model_path, tmp_path, loss_type, per_device=24, accumulation=1)
    for per_device, accumulation in [(8, 3), (3, 8), (1, 24)]:
        weights = _one_step_weights(tiny_model_path, tmp_path, loss_type, per_device, accumulation)
        for name in reference:
            update = (reference[name] - initial[name]).norm()
            assert (weights[name] - reference[name]).norm() <= 0.01 * update + 1e-7, (name, accumulation)


def test_split_micro_batches_scales_and_fills():
    batch = {
        "prompt_ids": torch.zeros(5, 2, dtype=torch.long),
        "prompt_mask": torch.ones(5, 2, dtype=torch.long),
        "completion_ids": torch.zeros(5, 3, dtype=torch.long),
        "completion_mask": torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]]),
        "advantages": torch.arange(5.0),
        "num_items_in_batch": torch.tensor(10),
    }
    filler = {key: value[:1] if value.dim() else value for key, value in batch.items()}
    filler["completion_mask"] = torch.zeros_like(filler["completion_mask"])
    chunks = split_micro_batches(batch, 3, LOSSES["grpo"].normalisation, filler, pad_token_id=0)
    assert [len(c["advantages"]) for c in chunks] == [2, 2, 1]
    assert [c["bapo_loss_scale"] for c in chunks] == pytest.approx([2 * 3 / 5, 2 * 3 / 5, 1 * 3 / 5])
    tokens = split_micro_batches(batch, 3, LOSSES["bnpo"].normalisation, filler, pad_token_id=0)
    assert [c["bapo_loss_scale"] for c in tokens] == pytest.approx([4 * 3 / 10, 5 * 3 / 10, 1 * 3 / 10])
    padded = split_micro_batches(batch, 7, LOSSES["dapo"].normalisation, filler, pad_token_id=0)
    assert [c["bapo_loss_scale"] for c in padded] == [1.0] * 5 + [0.0] * 2
    assert padded[-1]["advantages"] is filler["advantages"]
    # Equal sizes (several processes): 5 rows in 3 chunks of 2, the last one topped up with a filler row that
    # counts in TRL's per-sequence mean, so its scale covers 2 rows.
    equal = split_micro_batches(batch, 3, LOSSES["grpo"].normalisation, filler, pad_token_id=0, equal_sizes=True)
    assert [len(c["advantages"]) for c in equal] == [2, 2, 2]
    assert equal[2]["completion_mask"][1].sum() == 0
    assert [c["bapo_loss_scale"] for c in equal] == pytest.approx([2 * 3 / 5] * 3)


def test_all_three_parts_with_behavior_kl_train_without_nan(tiny_model_path, tmp_path):
    """Stale X1, re-evaluated X2 and replayed X3 in one batch, with the behavior-policy KL: no NaN anywhere."""
    plan = {f"{t}{name}=": ks for t in range(12) for name, ks in zip("abcd", [[2], [0, 2], [0, 0], [3]])}
    args = make_config(
        tmp_path,
        max_steps=12,
        max_completion_length=12,
        rollout_delay=3,
        reevaluation_interval=1,
        beta=0.05,
        high_quality_lower_range=[0.5, 0.5],
        high_quality_upper_range=[0.75, 0.75],
    )
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(plan), args=args, train_dataset=prompt_dataset(list(plan))
    )
    trainer.train()
    logs = bapo_logs(trainer)
    assert sum(log["bapo/x2"] for log in logs) > 0 and sum(log["bapo/x3"] for log in logs) > 0
    assert all(math.isfinite(log["grad_norm"]) and math.isfinite(log["kl"]) for log in logs)


def test_unmeasured_rows_survive_re_padding():
    """A part whose behavior log-probs are not measured yet (NaN) concatenated with a wider, measured part."""

    def part(rows, width, logps):
        return {
            "prompt_ids": torch.ones(rows, 2, dtype=torch.long),
            "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
            "completion_ids": torch.ones(rows, width, dtype=torch.long),
            "completion_mask": torch.ones(rows, width, dtype=torch.long),
            "advantages": torch.zeros(rows),
            "old_per_token_logps": torch.full((rows, width), logps),
        }

    merged = concat_batches([part(2, 3, math.nan), part(1, 5, -1.0)], pad_token_id=0)
    assert merged["old_per_token_logps"].shape == (3, 5)
    assert unmeasured_rows(merged["old_per_token_logps"]).tolist() == [True, True, False]
    assert merged["completion_mask"][0].tolist() == [1, 1, 1, 0, 0]


def test_token_types_over_prompt_and_completion_stay_aligned_when_parts_meet():
    """TRL's token_type_ids (Gemma-3) and mm_token_type_ids (Qwen-VL) cover the left-padded prompt, then the
    right-padded completion. Parts of different widths meet in every assembled batch; each half is re-padded on its
    own side, so token types stay on their tokens. (No tiny model here emits these fields: checked on TRL-shaped
    rows.)"""
    image = 9  # the image token: type 1

    def part(prompts, completions):
        width = max(map(len, prompts))
        prompt_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        completion_width = max(map(len, completions))
        completion_ids = torch.tensor([c + [0] * (completion_width - len(c)) for c in completions])
        types = torch.cat([(prompt_ids == image).long(), torch.zeros_like(completion_ids)], dim=1)
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": (prompt_ids != 0).long(),
            "completion_ids": completion_ids,
            "completion_mask": (completion_ids != 0).long(),
            "token_type_ids": types,
            "mm_token_type_ids": types.clone(),
        }

    merged = concat_batches(
        [part([[9, 9, 3], [4, 9]], [[5, 6, 7]] * 2), part([[9, 9, 9, 9, 3]], [[5]]), part([[3]], [[5, 6, 7, 8]])], 0
    )
    prompt_width = merged["prompt_ids"].shape[1]
    assert prompt_width == 5 and merged["completion_ids"].shape[1] == 4
    for key in ("token_type_ids", "mm_token_type_ids"):
        assert merged[key].shape == (4, 9)
        assert torch.equal(merged[key][:, :prompt_width], (merged["prompt_ids"] == image).long())
        assert not merged[key][:, prompt_width:].any()
