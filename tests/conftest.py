"""Shared fixtures: the tiny model (built once per session), configs and scripted rewards.

Every test trains through `trainer.train()` on the tiny model with real generation; where a test needs to
know group accuracies in advance it uses `ScriptedReward`, which decides how many of a group's G completions
are correct, per prompt and per time the prompt is scored.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
from collections import Counter, defaultdict

import pytest
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from datasets import Dataset
from transformers import TrainerCallback

from trl_bapo import BAPOConfig, BAPOTrainer
from trl_bapo.builtin.tiny import build_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing is downloaded here; offline, TRL's telemetry thread (rank 0 of every launch) opens no connection either.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

GROUP_SIZE = 4


@pytest.fixture(autouse=True)
def release_finished_engines():
    """Frees what a test leaves, colocated vLLM engines included. vLLM's engine freezes the heap at startup
    (`gc.freeze()`, undone only by its `shutdown()`), so the collector never frees a trainer built before that, and a
    trainer in a reference cycle (the tests' recorders make one: trainer, callback, trainer) stays with its engine
    and the engine's 1 GiB KV cache: the real-vLLM suite grew to 10 GiB before its server test started another."""
    yield
    gc.unfreeze()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def free_port() -> int:
    """A port no process on this machine listens on now. `accelerate launch` otherwise opens its process group on
    29500, which a second suite running on the same machine may hold (EADDRINUSE)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_settings(processes: int) -> list[str]:
    """`accelerate launch` options for the tests' multi-process runs on CPU: one machine, full precision, no
    compilation, and a process group on a free port."""
    return [
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def end_worker() -> None:
    """Ends a process of `accelerate launch` once its results are written: closes the process group, then exits
    without interpreter teardown. Trainers under DeepSpeed are never freed in process: after `gc.collect()` and
    `DeepSpeedEngine.destroy()` every engine of the process is still alive, and with them three gloo process groups
    whose six worker threads `destroy_process_group` cannot join (seen under ZeRO-3 in /proc/self/task). They would
    be torn down with the interpreter, which is where a finished ZeRO-3 worker aborted ("terminate called without
    an active exception", signal 6) once in 6 runs, after its results were written."""
    PartialState().destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def completion_logps(model, tokenizer, prompt: str, completion_ids: list[int]) -> torch.Tensor:
    """The tests' oracle for a policy's per-token log-probs of one completion: a forward pass of their own, on the
    prompt as text and the completion's token ids, independent of TRL's and BAPO's forwards."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(completion_ids).unsqueeze(1))[:, 0]


def batch_completion_logps(model, inputs: dict) -> torch.Tensor:
    """The same oracle on every row of a micro-batch at once, padded as TRL pads it: (rows, completion tokens)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(2, inputs["completion_ids"].unsqueeze(2))[..., 0]


# A small CPU run: 4 prompts x 4 completions per rollout step, two micro-batches per step. GRPOConfig takes it too.
SMALL = dict(
    per_device_train_batch_size=8,
    gradient_accumulation_steps=2,
    num_generations=GROUP_SIZE,
    max_completion_length=4,
    max_steps=4,
    learning_rate=1e-3,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
    shuffle_dataset=False,
)


def make_config(output_dir, **overrides) -> BAPOConfig:
    """`SMALL` as a BAPOConfig writing to `output_dir`."""
    return BAPOConfig(**{"output_dir": str(output_dir), **SMALL, **overrides})


def prompt_dataset(prompts: list[str]) -> Dataset:
    return Dataset.from_dict({"prompt": prompts})


class ScriptedReward:
    """Reward 1 for the first k completions of each group, with k = plan[prompt][n] the n-th time the prompt
    is scored (fresh rollouts score a prompt first, re-evaluations later). Records every call."""

    __name__ = "scripted_reward"

    def __init__(self, plan: dict[str, list[int]], default: int = 0):
        self.plan = plan
        self.default = default
        self.times_scored: Counter[str] = Counter()
        self.calls: list[dict] = []

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        seen_in_call: Counter[str] = Counter()
        groups: dict[str, int] = {}
        rewards = []
        for prompt in prompts:
            if prompt not in seen_in_call:
                groups[prompt] = self.times_scored[prompt]
            n = groups[prompt]
            plan = self.plan.get(prompt, [self.default])
            k = plan[min(n, len(plan) - 1)]
            rewards.append(float(seen_in_call[prompt] < k))
            seen_in_call[prompt] += 1
        for prompt in groups:
            self.times_scored[prompt] += 1
        self.calls.append({"step": kwargs["trainer_state"].global_step, "scored": dict(groups)})
        return rewards


def trained_groups(tokenizer, inputs: dict) -> Counter:
    """Prompts of the rows of a micro-batch that carry loss, counted in rows."""
    rows = Counter()
    for ids, prompt_mask, completion_mask in zip(
        inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_mask"]
    ):
        if completion_mask.sum() == 0:
            continue
        rows[tokenizer.decode(ids[prompt_mask.bool()])] += 1
    return rows


class BatchRecorder:
    """Wraps `trainer.compute_loss` to record, per optimizer step, which prompts were trained on."""

    def __init__(self, trainer):
        self.per_step: dict[int, Counter] = defaultdict(Counter)
        self.inputs: list[tuple[int, dict]] = []
        original = trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            step = trainer.state.global_step + 1
            self.per_step[step] += trained_groups(trainer.processing_class, inputs)
            self.inputs.append((step, inputs))
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss


class StopAt(TrainerCallback):
    """Ends training after optimizer step `step`, as an interrupted run would end."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def bapo_logs(trainer) -> list[dict]:
    """The per-step log entries (one per optimizer step with logging_steps=1)."""
    return [entry for entry in trainer.state.log_history if "bapo/x1" in entry]


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


class CPUFSDPTrainer(BAPOTrainer):
    """BAPOTrainer that also takes FSDP on several CPU processes, for the tests launched with an FSDP config.

    accelerate 1.15 puts several CPU processes in its MULTI_CPU mode and there ignores an FSDP configuration,
    although FSDP2 itself runs over gloo. This turns FSDP on with the plugin the launcher configured; accelerate's
    own FSDP2 preparation (`fully_shard`) and checkpointing then run unchanged. Without an FSDP config it is
    BAPOTrainer.
    """

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        fsdp_configured = os.environ.get("ACCELERATE_USE_FSDP") == "true"
        if fsdp_configured and self.accelerator.distributed_type == DistributedType.MULTI_CPU:
            # AcceleratorState copies PartialState's fields whenever it is built again, so both must say FSDP.
            PartialState().distributed_type = self.accelerator.state.distributed_type = DistributedType.FSDP
            self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
            self.is_fsdp_enabled = True
