"""vLLM path, exercised through a STAND-IN for vLLM (vLLM cannot run on these machines).

`StandInVLLMGeneration` implements the interface of `trl.generation.vllm_generation.VLLMGeneration` that
GRPOTrainer calls, `sync_weights()` and `generate(prompts, images, num_generations, profiler)`, backed by its own
copy of the tiny model sampling with plain torch. What is tested is BAPO's side: weights reach the engine only
on refresh steps, re-evaluation runs on freshly synced (current) weights, and the engine's per-token log-probs
become the behaviour log-probs the loss divides by. Real vLLM (server or colocate) is not exercised here.
"""

import math

import torch

from trl_bapo import BAPOTrainer
from trl_bapo.tiny import load_tiny_model

from conftest import ScriptedReward, bapo_logs, make_config, parameters, prompt_dataset


class StandInVLLMGeneration:
    """Stand-in for VLLMGeneration: an engine with its own weights, updated only by `sync_weights`."""

    def __init__(self, trainer, model_path, max_tokens):
        self.trainer = trainer
        self.engine = load_tiny_model(model_path).eval()
        self.max_tokens = max_tokens
        self.eos = trainer.processing_class.eos_token_id
        self.syncs, self.calls, self.logprobs = [], [], {}

    def sync_weights(self):
        self.engine.load_state_dict(self.trainer.model.state_dict())
        self.syncs.append(self.trainer.state.global_step)

    @torch.no_grad()
    def generate(self, prompts, images, num_generations, profiler=None):
        trained = parameters(self.trainer.model)
        current = all(torch.equal(trained[n], p) for n, p in self.engine.named_parameters())
        self.calls.append({"step": self.trainer.state.global_step, "prompts": prompts, "current_weights": current})
        completions, logprobs = [], []
        for prompt in prompts:
            ids, lps = list(prompt), []
            for _ in range(self.max_tokens):
                log_probs = torch.log_softmax(self.engine(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
                token = int(torch.multinomial(log_probs.exp(), 1))
                ids.append(token)
                lps.append(float(log_probs[token]))
                if token == self.eos:
                    break
            completion = ids[len(prompt) :]
            self.logprobs[(tuple(prompt), tuple(completion))] = lps
            completions.append(completion)
            logprobs.append(lps)
        return prompts, completions, [[[lp] for lp in seq] for seq in logprobs], [[[t] for t in c] for c in completions]


def test_vllm_stand_in_syncs_on_refresh_steps_and_supplies_behaviour_logps(tiny_model_path, tmp_path):
    plan = {f"{t}{name}=": ks for t in range(6) for name, ks in zip("abcd", [[2], [3], [0, 2], [1]])}
    args = make_config(tmp_path, max_steps=5, rollout_delay=2, reevaluation_interval=2, learning_rate=1e-2, beta=0.01)
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=ScriptedReward(plan), args=args, train_dataset=prompt_dataset(list(plan))
    )
    # What GRPOTrainer.__init__ does with use_vllm=True, minus starting vLLM.
    stand_in = StandInVLLMGeneration(trainer, tiny_model_path, args.max_completion_length)
    trainer.use_vllm, trainer.vllm_generation = True, stand_in
    trainer._configure_vllm()
    checked = []
    compute_loss = trainer.compute_loss

    def checking_compute_loss(model, inputs, *a, **k):
        assert "importance_sampling_ratio" not in inputs, "TRL's vLLM correction must be folded into BAPO's ratio"
        for row in range(len(inputs["prompt_ids"])):
            mask = inputs["completion_mask"][row].bool()
            if not mask.any() or "old_per_token_logps" not in inputs:
                continue
            key = (tuple(inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()].tolist()),
                   tuple(inputs["completion_ids"][row][mask].tolist()))
            expected = torch.tensor(stand_in.logprobs[key])
            torch.testing.assert_close(inputs["old_per_token_logps"][row][mask], expected, atol=1e-6, rtol=0)
            checked.append(key)
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = checking_compute_loss
    trainer.train()

    # Refresh steps t = 1, 2, 4 (t mod v == 0, and the first) run at global steps 0, 1, 3.
    assert stand_in.syncs == [0, 1, 3]
    tokenizer = trainer.processing_class
    reevaluations = [c for c in stand_in.calls if tokenizer.decode(c["prompts"][0])[1] == "c" and
                     int(tokenizer.decode(c["prompts"][0])[0]) < c["step"]]
    assert [c["step"] for c in reevaluations] == [1, 3]
    assert all(c["current_weights"] for c in reevaluations), "re-evaluation must see the current policy"
    assert not all(c["current_weights"] for c in stand_in.calls), "stale rollouts were expected between syncs"
    assert checked, "no behaviour log-probs were checked"
    assert [log["bapo/policy_lag"] for log in bapo_logs(trainer)] == [0, 0, 1, 0, 1]
    assert all(math.isfinite(log["grad_norm"]) for log in bapo_logs(trainer))


def test_vllm_stand_in_gets_weights_on_the_first_step_after_a_resume(tiny_model_path, tmp_path):
    """A restarted engine holds the base model: the first resumed step syncs even off the refresh schedule."""
    plan = {f"{t}{name}=": ks for t in range(6) for name, ks in zip("abcd", [[2], [3], [0, 2], [1]])}

    def trainer_with_stand_in(**overrides):
        args = make_config(tmp_path, rollout_delay=4, reevaluation_interval=4, save_strategy="steps", save_steps=2,
                           **overrides)
        trainer = BAPOTrainer(
            model=tiny_model_path, reward_funcs=ScriptedReward(plan), args=args, train_dataset=prompt_dataset(list(plan))
        )
        stand_in = StandInVLLMGeneration(trainer, tiny_model_path, args.max_completion_length)
        trainer.use_vllm, trainer.vllm_generation = True, stand_in
        trainer._configure_vllm()
        return trainer, stand_in

    first, first_engine = trainer_with_stand_in(max_steps=2)
    first.train()
    assert first_engine.syncs == [0]  # t = 1 only; t = 2 is not a refresh step (v = 4)
    resumed, engine = trainer_with_stand_in(max_steps=5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    # t = 3 (global step 2) is the first step of the new trainer, t = 4 (global step 3) a refresh step.
    assert engine.syncs == [2, 3]
    assert [log["bapo/policy_lag"] for log in bapo_logs(resumed)][-3:] == [2, 0, 1]  # history holds steps 1-2 too
