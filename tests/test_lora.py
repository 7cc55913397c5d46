"""LoRA through peft: adapters train, the rollout snapshot holds only adapter weights, the adapter loads back."""

import pytest
import torch
from conftest import ScriptedReward, bapo_logs, make_config, prompt_dataset
from peft import LoraConfig, PeftModel

from trl_bapo import BAPOTrainer
from trl_bapo.builtin.tiny import load_tiny_model


def test_lora_trains_adapters_and_snapshots_only_them(tiny_model_path, tmp_path):
    plan = {f"{t}{name}=": ks for t in range(6) for name, ks in zip("abcd", [[2], [0, 2], [3], [1]])}
    args = make_config(tmp_path, max_steps=4, rollout_delay=3, reevaluation_interval=2, learning_rate=5e-2, beta=0.01)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = BAPOTrainer(
        model=tiny_model_path,
        reward_funcs=ScriptedReward(plan),
        args=args,
        train_dataset=prompt_dataset(list(plan)),
        peft_config=lora,
    )
    adapter = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in adapter.items()}
    frozen_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()

    assert adapter and all("lora_" in name for name in adapter)
    assert any(not torch.equal(before[n], p) for n, p in adapter.items()), "adapters did not train"
    frozen_after = dict(trainer.model.named_parameters())
    assert all(torch.equal(frozen_before[n], frozen_after[n]) for n in frozen_before), "base weights moved"
    snapshot = trainer._bapo.snapshot.weights
    assert set(snapshot) == set(adapter)
    assert trainer._bapo.snapshot.num_elements() == sum(p.numel() for p in adapter.values())
    assert trainer._bapo.snapshot.num_elements() < 0.1 * sum(p.numel() for p in trainer.model.parameters())
    assert [log["bapo/policy_lag"] for log in bapo_logs(trainer)] == [0, 1, 0, 1]

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(load_tiny_model(tiny_model_path), str(tmp_path / "adapter"))
    reloaded_params = dict(reloaded.named_parameters())
    for name, param in adapter.items():
        torch.testing.assert_close(reloaded_params[name], param.detach(), atol=0, rtol=0, msg=name)
    # TRL patches the trained model's forward (fused LM head), so compare the reloaded model with the base.
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(
            reloaded(input_ids=ids).logits, load_tiny_model(tiny_model_path)(input_ids=ids).logits
        )


def test_overlap_with_lora_on_transformers_generate_is_refused(tiny_model_path, tmp_path):
    """The replica of alpha that transformers' generate runs on in the background is built for full models; with a
    vLLM server the background call names alpha's adapter instead (tests/real_vllm/test_server.py)."""
    args = make_config(tmp_path, rollout_delay=3, rollout_sampling_seed="per_step", overlap_rollout=True)
    with pytest.raises(ValueError, match="a PEFT model on transformers' generate"):
        BAPOTrainer(
            model=tiny_model_path,
            reward_funcs=ScriptedReward({"1a=": [1]}),
            args=args,
            train_dataset=prompt_dataset(["1a="] * 4),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        )
