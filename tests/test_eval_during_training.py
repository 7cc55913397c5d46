"""Evaluation during training (`eval_strategy="steps"`) in every KL mode, with and without PEFT.

Evaluation generates with the current policy and leaves the rollout policy alone: alpha is still the snapshot of
the last refresh afterwards. (With vLLM, tests/real_vllm/test_colocate.py checks the engine the same way.)
"""

import math

import pytest
import torch
from conftest import ScriptedReward, bapo_logs, make_config, prompt_dataset
from peft import LoraConfig
from transformers import TrainerCallback

from trl_bapo import BAPOTrainer

PLAN = {f"{t}{name}=": ks for t in range(6) for name, ks in zip("abcd", [[2], [3], [0, 2], [1]])}
MODES = {
    "behavior": dict(kl_reference="behavior"),
    "ref": dict(kl_reference="ref"),
    "peft": dict(kl_reference="behavior"),
}


class TrainedWeights(TrainerCallback):
    """`after[k]`: the trainable weights after k optimizer steps."""

    def __init__(self, trainer):
        self.trainer, self.after = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.model
        self.after[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", list(MODES))
def test_evaluation_runs_in_every_kl_mode_and_keeps_alpha(mode, tiny_model_path, tmp_path):
    args = make_config(
        tmp_path,
        max_steps=4,
        rollout_delay=3,
        reevaluation_interval=3,
        beta=0.05,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=8,
        **MODES[mode],
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = BAPOTrainer(
        model=tiny_model_path,
        reward_funcs=ScriptedReward(PLAN),
        args=args,
        train_dataset=prompt_dataset(list(PLAN)),
        eval_dataset=prompt_dataset([f"{i}e=" for i in range(4)]),
        peft_config=lora if mode == "peft" else None,
    )
    trained = TrainedWeights(trainer)
    trainer.add_callback(trained)
    trainer.train()

    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [1, 2, 3, 4]
    assert all(math.isfinite(entry["eval_loss"]) and "eval_reward" in entry for entry in evaluations)
    # The KL against the behavior policy is zero for samples the evaluated policy generated: nothing to log.
    # Against the reference model it is measured, as GRPOTrainer does.
    assert all(("eval_kl" in entry) == (mode == "ref") for entry in evaluations)
    assert [log["bapo/policy_lag"] for log in bapo_logs(trainer)] == [0, 1, 0, 1]
    # Evaluations after steps 1-4 left alpha at the refresh of t = 3, the weights after two optimizer steps.
    assert trainer._bapo.snapshot.step == 3
    after = trained.after
    for name, weight in trainer._bapo.snapshot.weights.items():
        assert torch.equal(weight, after[2][name]), name
    assert not all(torch.equal(after[2][n], after[4][n]) for n in after[2]), "training did not move away from alpha"
