"""Overlapped rollout (`overlap_rollout`) changes nothing but the clock: with per-step sampling seeds, a run that
generates step t+1 in the background while step t trains equals the same run without it bit for bit: final weights,
BAPO's state, every completion and every logged metric but timings (and `bapo/prefetched`, which says where a rollout
came from), with the same thread settings in both runs. Every run goes through `train()` on the tiny model."""

import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import accelerate_settings, make_config, parameters, prompt_dataset
from test_distributed import run
from transformers import TrainerCallback

from trl_bapo import BAPOConfig, BAPOTrainer

HERE = Path(__file__).parent
PROMPTS = [f"{a}+{b}=" for a in range(4) for b in range(6)]  # 24 prompts: 6 rollout steps an epoch
# Metrics that may differ: the clock, and whether a rollout came from the background.
UNEQUAL = ("seconds", "step_time", "runtime", "per_second", "bapo/prefetched")


class LengthParity:
    """A reward with state, as TRL users write them: it counts its calls and records every completion it scored."""

    __name__ = "length_parity"

    def __init__(self):
        self.completions: list[list[str]] = []

    def __call__(self, completions, **kwargs):
        self.completions.append(list(completions))
        return [float((len(completion) + len(self.completions)) % 2) for completion in completions]


def train(model, out, overlap: bool, reward=None, **overrides) -> tuple[BAPOTrainer, LengthParity]:
    reward = reward or LengthParity()
    settings = dict(rollout_delay=3, max_steps=8, rollout_sampling_seed="per_step", overlap_rollout=overlap)
    args = make_config(out, **{**settings, **overrides})
    dataset = prompt_dataset(PROMPTS)
    evaluation = dict(eval_dataset=prompt_dataset(PROMPTS[:4])) if args.eval_strategy != "no" else {}
    trainer = BAPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset, **evaluation)
    trainer.train()
    return trainer, reward


def compared_logs(trainer) -> list[dict]:
    return [
        {key: value for key, value in entry.items() if not any(part in key for part in UNEQUAL)}
        for entry in trainer.state.log_history
    ]


def assert_same_run(sync, overlapped) -> None:
    (sync_trainer, sync_reward), (overlap_trainer, overlap_reward) = sync, overlapped
    sync_weights, overlap_weights = parameters(sync_trainer.model), parameters(overlap_trainer.model)
    assert all(torch.equal(sync_weights[name], overlap_weights[name]) for name in sync_weights)
    assert overlap_reward.completions == sync_reward.completions
    assert compared_logs(overlap_trainer) == compared_logs(sync_trainer)
    assert overlap_trainer.bapo_status == sync_trainer.bapo_status
    prefetched = [
        entry["bapo/prefetched"] for entry in overlap_trainer.state.log_history if "bapo/prefetched" in entry
    ]
    assert sum(prefetched) >= 2, f"nothing ran in the background: {prefetched}"
    assert not any(entry.get("bapo/prefetched") for entry in sync_trainer.state.log_history)
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("bapo-prefetch")]


def dropout_model(tiny_model_path, tmp_path) -> str:
    """The tiny model with attention dropout, which training draws from the global random state."""
    path = tmp_path / "dropout-model"
    shutil.copytree(tiny_model_path, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.2}))
    return str(path)


@pytest.mark.parametrize(
    "case",
    ["dropout", "gradient_checkpointing", "evaluation"],
)
def test_an_overlapped_run_equals_the_synchronous_one(case, tiny_model_path, tmp_path):
    model = dropout_model(tiny_model_path, tmp_path) if case == "dropout" else tiny_model_path
    settings = {
        "dropout": {},
        "gradient_checkpointing": dict(gradient_checkpointing=True),
        # Evaluation samples with the current policy between two rollout steps; the step before it does not prefetch.
        "evaluation": dict(eval_strategy="steps", eval_steps=4, per_device_eval_batch_size=8),
    }[case]
    sync = train(model, tmp_path / "sync", overlap=False, **settings)
    overlapped = train(model, tmp_path / "overlap", overlap=True, **settings)
    assert_same_run(sync, overlapped)
    if case == "evaluation":
        assert [entry for entry in overlapped[0].state.log_history if "eval_loss" in entry]


def test_per_step_seeds_make_the_rollout_independent_of_other_draws(tiny_model_path, tmp_path):
    """With per-step seeds, drawing from the global random state between steps changes no rollout; with the global
    seed it does (the control)."""

    class DrawsFromGlobalState(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.rand(1000)

    def completions(seed_mode, draws, out):
        reward = LengthParity()
        args = make_config(out, rollout_delay=3, max_steps=3, rollout_sampling_seed=seed_mode)
        trainer = BAPOTrainer(
            model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(PROMPTS)
        )
        if draws:
            trainer.add_callback(DrawsFromGlobalState())
        trainer.train()
        return reward.completions

    assert completions("per_step", False, tmp_path / "a") == completions("per_step", True, tmp_path / "b")
    assert completions("global", False, tmp_path / "c") != completions("global", True, tmp_path / "d")


def test_resume_in_a_delay_window_equals_the_straight_run(tiny_model_path, tmp_path):
    """A checkpoint at optimizer step 4 (rollout step 4, inside the window 3-5) while step 5's rollout is in the
    background; resumed with overlap, the run ends as the synchronous run without a stop does."""
    straight = train(tiny_model_path, tmp_path / "straight", overlap=False)
    first = train(tiny_model_path, tmp_path / "resumed", overlap=True, save_strategy="steps", save_steps=4)
    prefetched = [entry["bapo/prefetched"] for entry in first[0].state.log_history if "bapo/prefetched" in entry]
    assert prefetched[4] == 1  # step 5's rollout was in the background when step 4's checkpoint was written
    reward = LengthParity()
    reward.completions = list(first[1].completions[:4])  # the reward's state as it was at the checkpoint
    args = make_config(
        tmp_path / "resumed", rollout_delay=3, max_steps=8, rollout_sampling_seed="per_step", overlap_rollout=True
    )
    resumed = BAPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset(PROMPTS))
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    straight_weights, resumed_weights = parameters(straight[0].model), parameters(resumed.model)
    assert all(torch.equal(straight_weights[name], resumed_weights[name]) for name in straight_weights)
    assert reward.completions == straight[1].completions
    assert resumed.bapo_status == straight[0].bapo_status


class FailingGenerate:
    """transformers' generate that fails at its `fail_at`-th call, as an engine error would."""

    def __init__(self, fail_at: int):
        self.fail_at, self.calls = fail_at, 0

    def __enter__(self):
        from transformers import GenerationMixin

        self.original = GenerationMixin.generate
        failing = self

        def generate(model, *args, **kwargs):
            failing.calls += 1
            if failing.calls == failing.fail_at:
                raise RuntimeError(f"engine failed at its call {failing.fail_at}")
            return failing.original(model, *args, **kwargs)

        GenerationMixin.generate = generate
        return self

    def __exit__(self, *exc):
        from transformers import GenerationMixin

        GenerationMixin.generate = self.original


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failed_engine_call_fails_the_run_as_the_synchronous_one_does(overlap, tiny_model_path, tmp_path):
    with FailingGenerate(fail_at=2), pytest.raises(RuntimeError, match="engine failed at its call 2"):
        train(tiny_model_path, tmp_path, overlap=overlap)
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("bapo-prefetch")]


def test_an_interrupt_leaves_no_background_call(tiny_model_path, tmp_path):
    """Training stopped by an exception while step 2's rollout runs in the background: the error comes through, and
    no thread is left."""

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                raise KeyboardInterrupt

    args = make_config(tmp_path, rollout_delay=3, max_steps=8, rollout_sampling_seed="per_step", overlap_rollout=True)
    trainer = BAPOTrainer(
        model=tiny_model_path, reward_funcs=LengthParity(), args=args, train_dataset=prompt_dataset(PROMPTS)
    )
    trainer.add_callback(Interrupt())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer._engine_calls._pending is None
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("bapo-prefetch")]


def test_two_processes_overlapped_equal_synchronous(tiny_model_path, tmp_path):
    """DDP on 2 processes: each process's overlapped run equals its synchronous run."""
    worker = HERE / "overlap_worker.py"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", *accelerate_settings(2)]
    run([*command, str(worker), str(tmp_path), tiny_model_path])
    for rank in range(2):
        sync, overlapped = (json.loads((tmp_path / f"{mode}-{rank}.json").read_text()) for mode in ("sync", "overlap"))
        assert sum(overlapped.pop("prefetched")) >= 2 and sum(sync.pop("prefetched")) == 0
        assert overlapped == sync


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(overlap_rollout=True), "rollout_sampling_seed='per_step'"),
        (dict(overlap_rollout=True, rollout_sampling_seed="per_step", rollout_delay=1), "rollout_delay > 1"),
        (dict(rollout_sampling_seed="each"), "rollout_sampling_seed must be one of"),
        (dict(rollout_sampling_seed="per_step", use_vllm=True, vllm_mode="colocate"), "share the seed"),
    ],
)
def test_overlap_settings_that_cannot_hold_are_refused(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **settings)
