"""The decoupled off-policy correction, through `trainer.train()`: two optimizer updates per rollout step, a stale
rollout policy, re-evaluated and replayed groups, and every micro-batch's loss recomputed by hand.

The hand computation takes its three policies from independent oracles: the behavior policy's log-probs are
measured inside the reward function (the weights that just generated each completion), pi_start from a copy of
the weights made when each rollout step begins, and the current policy from a forward pass of the test's own. With
`x3_anchor="stored"` (the authors'), a replayed row's anchor is pi_start of the step that generated it.
"""

import pytest
import torch
from conftest import ScriptedReward, bapo_logs, completion_logps, make_config, parameters, prompt_dataset
from transformers import TrainerCallback

from trl_bapo import BAPOConfig, BAPOTrainer

PLAN = {
    f"{t}{name}=": ks for t in range(8) for name, ks in zip("abcdefgh", [[2], [1], [0, 2], [3], [4], [0], [2], [1]])
}
UPDATES = 2  # optimizer updates per rollout step
CAP = 1.05  # low, so that the truncation shows


class StartOfRolloutStep(TrainerCallback):
    """pi_start: the weights as each rollout step begins (before its first update), kept for every step."""

    def __init__(self, trainer):
        self.trainer, self.weights = trainer, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % UPDATES == 0:
            self.weights[state.global_step // UPDATES + 1] = parameters(self.trainer.model)

    def logps(self, step: int, prompt: str, completion: list[int]) -> torch.Tensor:
        """Log-probs under pi_start of rollout step `step`, measured by the trainer's model with those weights put
        back for a moment."""
        model, now = self.trainer.model, parameters(self.trainer.model)
        model.load_state_dict(self.weights[step], strict=False)
        try:
            return completion_logps(model, self.trainer.processing_class, prompt, completion)
        finally:
            model.load_state_dict(now, strict=False)


@pytest.mark.parametrize("x3_anchor", ["start", "stored"])
def test_decoupled_loss_equals_its_definition_on_stale_and_replayed_rows(tiny_model_path, tmp_path, x3_anchor):
    args = make_config(
        tmp_path,
        max_steps=4 * UPDATES,
        steps_per_generation=2 * UPDATES,  # two micro-batches per update
        rollout_delay=2,
        reevaluation_interval=2,
        learning_rate=5e-2,
        loss_type="grpo",
        high_quality_lower_range=[0.25, 0.25],
        high_quality_upper_range=[0.5, 0.5],
        off_policy_correction="decoupled",
        importance_sampling_cap=CAP,
        x3_anchor=x3_anchor,
    )
    scripted, behavior, generated_at = ScriptedReward(PLAN), {}, {}

    def reward(prompts, completions, completion_ids, **kwargs):
        for prompt, ids in zip(prompts, completion_ids):
            behavior[(prompt, tuple(ids))] = completion_logps(trainer.model, trainer.processing_class, prompt, ids)
            generated_at[(prompt, tuple(ids))] = trainer.bapo_status.rollout_step
        return scripted(prompts, completions, **kwargs)

    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(list(PLAN))
    )
    start = StartOfRolloutStep(trainer)
    trainer.add_callback(start)
    checked = {"rows": 0, "stale": 0, "truncated": 0, "moved": 0, "anchored_earlier": 0}
    compute_loss = trainer.compute_loss

    def checking_compute_loss(model, inputs, *a, **k):
        tokenizer, rows, now = trainer.processing_class, [], trainer.bapo_status.rollout_step
        masks = inputs["completion_mask"].bool()
        prompts = [
            tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(inputs["prompt_ids"], inputs["prompt_mask"])
        ]
        completions = [ids[mask].tolist() for ids, mask in zip(inputs["completion_ids"], masks)]
        for row, (prompt, ids, mask) in enumerate(zip(prompts, completions, masks)):
            if not ids:
                rows.append(torch.tensor(0.0))
                continue
            replayed = int(inputs["bapo_source"][row]) == 3
            anchored_at = generated_at[(prompt, tuple(ids))] if replayed and x3_anchor == "stored" else now
            anchor = start.logps(anchored_at, prompt, ids)
            current = completion_logps(trainer.model, tokenizer, prompt, ids)
            generated = behavior[(prompt, tuple(ids))]
            torch.testing.assert_close(inputs["old_per_token_logps"][row][mask], anchor, atol=1e-5, rtol=0)
            weight = torch.exp(anchor - generated).clamp(max=CAP)
            ratio = torch.exp(current - anchor)
            advantage = inputs["advantages"][row]
            surrogate = -torch.min(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
            rows.append((surrogate * weight).mean())
            checked["rows"] += 1
            checked["stale"] += int((anchor - generated).abs().max() > 1e-3)
            checked["truncated"] += int((torch.exp(anchor - generated) > CAP).any())
            checked["moved"] += int((current - anchor).abs().max() > 1e-3)
            if anchored_at != now:
                checked["anchored_earlier"] += int((anchor - start.logps(now, prompt, ids)).abs().max() > 1e-3)
        loss = compute_loss(model, inputs, *a, **k)
        expected = torch.stack(rows).mean() / args.gradient_accumulation_steps * inputs["bapo_loss_scale"]
        torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-4)
        return loss

    trainer.compute_loss = checking_compute_loss
    trainer.train()

    logs = bapo_logs(trainer)
    assert checked["stale"] and checked["truncated"] and checked["moved"], checked
    assert bool(checked["anchored_earlier"]) == (x3_anchor == "stored"), checked
    assert sum(log["bapo/x2"] for log in logs) and sum(log["bapo/x3"] for log in logs), "no replayed group trained"
    weights = [(key, value) for log in logs for key, value in log.items() if "/is_" in key]
    assert {"bapo/x1/is_weight_mean", "bapo/x1/is_weight_max", "bapo/x1/is_truncated"} <= {key for key, _ in weights}
    assert all(value <= CAP + 1e-6 for key, value in weights if key.endswith("is_weight_max"))
    assert any(value > 0 for key, value in weights if key.endswith("is_truncated")), weights
    # X2 is generated by the policy that starts its step: its weight is exactly 1.
    assert all(log["bapo/x2/is_weight_mean"] == 1.0 for log in logs if "bapo/x2/is_weight_mean" in log)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(off_policy_correction="proximal"), "off_policy_correction"),
        (dict(off_policy_correction="decoupled", importance_sampling_cap=0.5), "importance_sampling_cap"),
        (dict(off_policy_correction="decoupled", loss_type="vespo"), "vespo"),
    ],
)
def test_decoupled_options_fail_clearly(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)
