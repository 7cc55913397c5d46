"""With every BAPO feature off, BAPOTrainer trains exactly as GRPOTrainer does."""

import pytest
import torch
from conftest import make_config, parameters
from trl import GRPOConfig, GRPOTrainer

from trl_bapo import BAPOTrainer
from trl_bapo.builtin.tasks import arithmetic_dataset, exact_answer_reward
from trl_bapo.builtin.tiny import load_tiny_model

COMMON = dict(
    per_device_train_batch_size=8,
    gradient_accumulation_steps=2,
    num_generations=4,
    max_completion_length=4,
    max_steps=3,
    learning_rate=1e-2,
    beta=0.04,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    seed=7,
    disable_tqdm=True,
)

FEATURES_OFF = dict(
    online_filter="none",
    use_difficult_replay=False,
    use_high_quality_replay=False,
    kl_reference="ref",
    shuffle_dataset=True,
)


def length_reward(completions, **kwargs):
    """Graded reward so that groups differ and GRPO has something to learn from on an untrained model."""
    return [float(len(completion)) / 4 for completion in completions]


def _train(trainer_class, config, model_path, tmp_path):
    trainer = trainer_class(
        model=model_path,
        reward_funcs=[exact_answer_reward, length_reward],
        args=config,
        train_dataset=arithmetic_dataset(64, seed=3),
    )
    trainer.train()
    return parameters(trainer.model)


def test_bapo_with_features_off_matches_grpo(tiny_model_path, tmp_path):
    grpo = _train(GRPOTrainer, GRPOConfig(output_dir=str(tmp_path / "grpo"), **COMMON), tiny_model_path, tmp_path)
    bapo_off = make_config(tmp_path / "bapo", rollout_delay=1, **FEATURES_OFF, **COMMON)
    bapo = _train(BAPOTrainer, bapo_off, tiny_model_path, tmp_path)
    initial = parameters(load_tiny_model(tiny_model_path))

    assert any(not torch.equal(initial[name], grpo[name]) for name in grpo), "GRPO did not train"
    for name in grpo:
        torch.testing.assert_close(bapo[name], grpo[name], rtol=0, atol=1e-7, msg=f"{name} differs from GRPO")

    # The same run with a delayed rollout policy must end elsewhere: the comparison above can fail.
    delayed = make_config(tmp_path / "delayed", rollout_delay=2, **FEATURES_OFF, **COMMON)
    bapo_delayed = _train(BAPOTrainer, delayed, tiny_model_path, tmp_path)
    assert any(not torch.allclose(bapo_delayed[name], grpo[name], atol=1e-6) for name in grpo)


def _bnpo_weights(model_path, tmp_path, accumulation, steps_per_generation):
    schedule = dict(
        COMMON,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=steps_per_generation,
        per_device_train_batch_size=32 // steps_per_generation,
        max_steps=1,
        loss_type="bnpo",
    )
    grpo_args = GRPOConfig(output_dir=str(tmp_path / f"grpo{steps_per_generation}"), **schedule)
    bapo_args = make_config(tmp_path / f"bapo{steps_per_generation}", rollout_delay=1, **FEATURES_OFF, **schedule)
    return _train(GRPOTrainer, grpo_args, model_path, tmp_path), _train(BAPOTrainer, bapo_args, model_path, tmp_path)


def test_bnpo_with_features_off_matches_grpo_with_one_micro_batch_a_rollout(tiny_model_path, tmp_path):
    """bnpo normalises by tokens. BAPO takes the token mean over the whole rollout batch, however it is cut
    (test_batches.py); TRL takes each micro-batch's token mean. They agree, within 1e-7, when a rollout is one
    micro-batch, and differ otherwise: Hypothesis found the split of one rollout into two optimizer steps
    (test_invariants.py), kept here."""
    grpo, bapo = _bnpo_weights(tiny_model_path, tmp_path, accumulation=1, steps_per_generation=1)
    for name in grpo:
        torch.testing.assert_close(bapo[name], grpo[name], rtol=0, atol=1e-7, msg=f"{name} differs from GRPO")
    grpo, bapo = _bnpo_weights(tiny_model_path, tmp_path, accumulation=1, steps_per_generation=2)
    assert any(not torch.allclose(bapo[name], grpo[name], rtol=0, atol=1e-7) for name in grpo)


def test_a_rollout_step_that_is_not_whole_optimizer_steps_is_refused_with_the_features_off(tmp_path):
    """BAPO cuts every rollout batch into whole optimizer steps, its features on or off; found by review: with them
    off, steps_per_generation 3 over gradient_accumulation_steps 2 crashed with an IndexError at the first step,
    where GRPOTrainer trains. Refused at build instead, as with the features on."""
    with pytest.raises(ValueError, match=r"steps_per_generation \(3\) must be a multiple of gradient_accumulation"):
        make_config(tmp_path, rollout_delay=1, **FEATURES_OFF, gradient_accumulation_steps=2, steps_per_generation=3)
