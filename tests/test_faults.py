"""Faults injected on purpose, each through `train()`, the constructor or the CLI: every one ends in a clear message
naming the field or file, and nothing written before the fault is lost (a resumed run ends with the weights of an
uninterrupted one)."""

import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import bapo_logs, end_worker, make_config, parameters, prompt_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trl import GRPOTrainer

from trl_bapo import BAPOConfig, BAPOTrainer, cli
from trl_bapo import checkpoint as checkpoint_module
from trl_bapo.checkpoint import COMPLETE_FILE, state_file

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PROMPTS = [f"{i}+{j}=" for i in range(4) for j in range(4)]
SETTINGS = dict(max_steps=4, rollout_delay=2, reevaluation_interval=2, learning_rate=1e-2)


def ones_reward(completions, **kwargs):
    """0/1, and stateless, so a run started again in another process scores as the first did."""
    return [float(completion.count("1") % 2) for completion in completions]


def trainer(model, output_dir, reward=ones_reward, **overrides) -> BAPOTrainer:
    args = make_config(output_dir, **{**SETTINGS, **overrides})
    return BAPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompt_dataset(PROMPTS))


def saving(model, output_dir, **overrides) -> BAPOTrainer:
    return trainer(model, output_dir, save_strategy="steps", save_steps=2, **overrides)


def assert_same_weights(actual: BAPOTrainer, expected: BAPOTrainer) -> None:
    got, want = parameters(actual.model), parameters(expected.model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0, msg=name)


@pytest.fixture
def straight(tiny_model_path, tmp_path):
    """The uninterrupted run every resumed one must end equal to."""
    run = trainer(tiny_model_path, tmp_path / "straight")
    run.train()
    return run


def resume_skipping_the_partial_checkpoint(model, output_dir, straight, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        resumed = saving(model, output_dir)
        resumed.train(resume_from_checkpoint=True)
    skipped = [r.getMessage() for r in caplog.records if "Resuming from" in r.getMessage()]
    assert len(skipped) == 1 and "checkpoint-2, not from" in skipped[0] and "checkpoint-4" in skipped[0], skipped
    assert_same_weights(resumed, straight)


def test_a_full_disk_during_the_state_save_loses_nothing(tiny_model_path, tmp_path, monkeypatch, straight, caplog):
    save = torch.save

    def full_disk(value, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith(".pt.tmp"):
            Path(path).write_bytes(b"half a state")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(value, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RuntimeError, match=r"Could not write BAPO's state to .*checkpoint-4.*No space left"):
        saving(tiny_model_path, tmp_path / "run").train()
    monkeypatch.setattr(torch, "save", save)
    partial = tmp_path / "run" / "checkpoint-4"
    assert not list(partial.glob("bapo_state*")) and not (partial / COMPLETE_FILE).exists()
    assert (tmp_path / "run" / "checkpoint-2" / COMPLETE_FILE).exists()
    resume_skipping_the_partial_checkpoint(tiny_model_path, tmp_path / "run", straight, caplog)


def killed_mid_save(model: str, output_dir: str) -> None:
    """Run in a child process: SIGKILL half-way through writing checkpoint-4's state, as a preempted job dies."""
    write = checkpoint_module.write_state

    def dying_write(path, state):
        if "checkpoint-4" in path:
            Path(f"{path}.tmp").write_bytes(b"half a state")
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, state)

    checkpoint_module.write_state = dying_write
    saving(model, output_dir).train()


def test_a_run_killed_mid_save_resumes_from_the_last_complete_checkpoint(tiny_model_path, tmp_path, straight, caplog):
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_faults as t; t.killed_mid_save(*sys.argv[1:])"
    killed = subprocess.run([sys.executable, "-c", code, tiny_model_path, str(tmp_path / "run")], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (tmp_path / "run" / "checkpoint-4").is_dir()  # the partial checkpoint transformers would pick
    resume_skipping_the_partial_checkpoint(tiny_model_path, tmp_path / "run", straight, caplog)


def test_a_state_file_from_another_step_is_refused_and_changed_thresholds_are_named(tiny_model_path, tmp_path, caplog):
    saving(tiny_model_path, tmp_path / "run").train()
    run = tmp_path / "run"
    shutil.copy(state_file(run / "checkpoint-2", 0), state_file(run / "checkpoint-4", 0))
    with pytest.raises(ValueError, match=r"bapo_state_0.pt .*saved at optimizer step 2.*checkpoint is at step 4"):
        saving(tiny_model_path, run, max_steps=6).train(resume_from_checkpoint=str(run / "checkpoint-4"))
    with caplog.at_level(logging.WARNING):
        resumed = saving(tiny_model_path, run, difficult_threshold=0.0)
        resumed.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    changed = [r.getMessage() for r in caplog.records if "in the checkpoint and is" in r.getMessage()]
    assert changed == [
        "difficult_threshold (c1) was 0.125 in the checkpoint and is 0.0 now; the configured value applies."
    ]


def test_an_unwritable_output_dir_is_refused_before_training(tiny_model_path, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    # As root, permission bits refuse nothing; the immutable attribute refuses even root.
    subprocess.run(["chattr", "+i", str(locked)], check=True)
    try:
        with pytest.raises(ValueError, match=rf"output_dir '{locked}' is not writable .*Choose a writable output_dir"):
            trainer(tiny_model_path, locked)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_non_finite_rewards_stop_the_run_naming_the_reward(tiny_model_path, tmp_path, value):
    def broken_reward(completions, **kwargs):
        return [value] + [1.0] * (len(completions) - 1)

    with pytest.raises(ValueError, match=rf"`broken_reward` returned \[{value}\] for 1 of 16 .*non_finite_rewards"):
        trainer(tiny_model_path, tmp_path, reward=broken_reward).train()


def test_non_finite_rewards_read_as_missing_when_asked(tiny_model_path, tmp_path):
    def spiky_reward(completions, **kwargs):
        rewards = ones_reward(completions)
        return [math.inf, -math.inf, math.nan] + rewards[3:]

    run = trainer(tiny_model_path, tmp_path, reward=spiky_reward, non_finite_rewards="none")
    before = parameters(run.model)
    run.train()
    logs = bapo_logs(run)
    assert [log["bapo/non_finite_rewards"] for log in logs] == [2.0] * 4
    status = run.bapo_status
    assert all(math.isfinite(x) for x in (status.r_tot, status.c2, status.c3)) and 0 <= status.r_tot <= 1
    assert any(not torch.equal(before[name], value) for name, value in parameters(run.model).items())


def test_bad_values_are_refused_and_ignored_options_named(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"difficult_threshold \(c1\) = 0.25 lies above .*high_quality_lower_range"):
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, difficult_threshold=0.25)
    BAPOConfig(output_dir=str(tmp_path), use_cpu=True, difficult_threshold=0.125)  # equal to c2's edge: allowed
    BAPOConfig(output_dir=str(tmp_path), use_cpu=True, difficult_threshold=0.25, use_high_quality_replay=False)
    with pytest.raises(ValueError, match=r"online_filter_gaussian_mean must lie in \[0, 1\].*-3"):
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, online_filter="gaussian", online_filter_gaussian_mean=-3)
    with pytest.raises(ValueError, match=r"top_p makes generation sample from a truncated .*\(rollout_delay=1"):
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, top_p=0.9)
    with pytest.raises(ValueError, match=r"generation_kwargs\['min_p'\] makes generation sample"):
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, generation_kwargs={"min_p": 0.1})
    with pytest.raises(ValueError, match=r"generation_kwargs\['top_p'\] makes generation sample"):
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, generation_kwargs='{"top_p": 0.9}')  # as the CLI passes it
    with pytest.raises(ValueError, match=r"steps_per_generation \(3\) must be a multiple of gradient_accumulation"):
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, gradient_accumulation_steps=2, steps_per_generation=3)
    fresh_only = dict(rollout_delay=1, use_high_quality_replay=False)
    assert BAPOConfig(output_dir=str(tmp_path), use_cpu=True, top_p=0.9, **fresh_only).top_p == 0.9
    with pytest.raises(ValueError, match="non_finite_rewards must be one of"):
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, non_finite_rewards="skip")
    with caplog.at_level(logging.WARNING):
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, use_difficult_replay=False, reevaluation_interval=3)
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, online_filter_uniform_keep=0.5)
        BAPOConfig(output_dir=str(tmp_path), use_cpu=True, use_difficult_replay=False)  # nothing set: no word
    assert [r.getMessage() for r in caplog.records] == [
        "reevaluation_interval=3 is ignored with use_difficult_replay=False (no X2); unset it, or change that option.",
        "online_filter_uniform_keep=0.5 is ignored with online_filter='range'; unset it, or change that option.",
    ]


def test_a_yaml_typo_names_the_key_the_file_and_the_closest_field(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((ROOT / "recipes" / "demo.yaml").read_text().replace("rollout_delay:", "rollout_dealy:"))
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--config", str(recipe), "--max_steps", "1"])
    assert str(stopped.value) == f"trl-bapo: unknown key 'rollout_dealy' in {recipe}; did you mean 'rollout_delay'?"


def test_a_dataset_without_prompts_or_rows_is_refused_before_anything_loads(tmp_path):
    """The model path does not exist: the checks come before TRL would load it."""
    args = make_config(tmp_path)
    missing = str(tmp_path / "no-model-here")
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column \(its columns: \['question'\]\)"):
        BAPOTrainer(
            model=missing,
            reward_funcs=ones_reward,
            args=args,
            train_dataset=prompt_dataset(PROMPTS).rename_column("prompt", "question"),
        )
    with pytest.raises(ValueError, match="train_dataset is empty: training would take 0 steps"):
        BAPOTrainer(model=missing, reward_funcs=ones_reward, args=args, train_dataset=prompt_dataset([]))


def constant_reward(completions, **kwargs):
    return [0.0] * len(completions)


def test_a_dataset_smaller_than_one_rollout_batch_is_refused_and_one_batch_trains(tiny_model_path, tmp_path):
    """make_config's rollout batch: 16 completions, 4 of each prompt, so 4 prompts. 3 rows, the most that give TRL's
    sampler no batch, trained 0 steps and exited 0; 4 rows train."""

    def build(rows: int) -> BAPOTrainer:
        args = make_config(tmp_path, max_steps=2)
        return BAPOTrainer(tiny_model_path, constant_reward, args, train_dataset=prompt_dataset(PROMPTS[:rows]))

    with pytest.raises(ValueError, match=r"has 3 rows, fewer than the 4 prompts of one rollout batch.*least 4 rows"):
        build(3)
    run = build(4)
    run.train()
    assert run.state.global_step == 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), group=st.integers(2, 4), prompts=st.integers(1, 6), offset=st.integers(-3, 3))
def test_a_dataset_is_refused_exactly_when_trl_would_train_it_0_steps(
    tiny_model_path, tmp_path, data, group, prompts, offset
):
    """Rollout batches of `prompts` prompts, split into per-device batches in any way; datasets of a few rows around
    it. TRL's own trainer, on the same config and dataset, says how many batches its dataloader hands out."""
    completions = prompts * group
    steps = data.draw(st.sampled_from([d for d in range(1, completions + 1) if completions % d == 0]), "steps")
    args = make_config(
        tmp_path,
        num_generations=group,
        per_device_train_batch_size=completions // steps,
        steps_per_generation=steps,
        gradient_accumulation_steps=1,
    )
    dataset = prompt_dataset(PROMPTS[: max(1, prompts + offset)])
    trl_trainer = GRPOTrainer(tiny_model_path, constant_reward, args=args, train_dataset=dataset)
    batches = len(trl_trainer.get_train_dataloader())
    try:
        run = BAPOTrainer(model=tiny_model_path, reward_funcs=constant_reward, args=args, train_dataset=dataset)
    except ValueError as refusal:
        assert f"{len(dataset)} rows, fewer than the {prompts} prompts" in str(refusal)
        assert batches == 0
    else:
        assert batches > 0 and len(run.get_train_dataloader()) == batches


class NoServer:
    """Stands in for TRL's client of the vLLM server (`trl.generation.vllm_client.VLLMClient`) where no server runs: it
    connects to nothing, takes the weights it is sent, and answers each prompt with completions of its own. TRL's
    server mode around it (`VLLMGeneration`: the prompts gathered over the processes, the completions broadcast back)
    is TRL's own."""

    def __init__(self, **connection):
        pass

    def init_communicator(self, device):
        pass

    def update_named_params(self, metadata, params):
        for _ in params:
            pass

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, n, **sampling):
        completions = [[4 + i % 5] * (1 + i % 3) for i in range(len(prompts) * n)]
        return {
            "prompt_ids": prompts,
            "completion_ids": completions,
            "logprobs": [[[-1.0]] * len(completion) for completion in completions],
        }


def on_the_server_under_torchrun(model: str, output_dir: str) -> None:
    """Run by `torchrun` in one process: a process group of one, as on a GPU machine where TRL's server call gathers
    the prompts over it. A synchronous run trains through TRL's server mode; the overlapped rollout is refused."""
    from trl.generation import vllm_generation

    vllm_generation.is_vllm_available, vllm_generation.VLLMClient = lambda: True, NoServer
    server = dict(use_vllm=True, vllm_mode="server", vllm_importance_sampling_correction=False, max_steps=2)
    run = trainer(model, output_dir, **server)
    assert run.accelerator.distributed_type == DistributedType.MULTI_CPU and run.accelerator.num_processes == 1
    run.train()
    assert run.state.global_step == 2
    with pytest.raises(ValueError, match=r"the vLLM server in a process group .*torchrun"):
        trainer(model, output_dir, overlap_rollout=True, rollout_sampling_seed="per_step", **server)
    end_worker()


def test_the_vllm_server_under_torchrun_with_one_process_trains_but_does_not_overlap(tiny_model_path, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_faults as t; "
        "t.on_the_server_under_torchrun(*sys.argv[1:])\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command = [*torchrun, str(worker), tiny_model_path, str(tmp_path / "run")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def test_the_completion_marker_records_the_step(tiny_model_path, tmp_path):
    saving(tiny_model_path, tmp_path).train()
    for step in (2, 4):
        marker = json.loads((tmp_path / f"checkpoint-{step}" / COMPLETE_FILE).read_text())
        assert marker == {"global_step": step, "processes": 1}
