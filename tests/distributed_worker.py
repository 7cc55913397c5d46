"""Trains BAPO in every process of `accelerate launch`; run by test_distributed.py.

    accelerate launch [engine flags] distributed_worker.py SCENARIO OUTPUT_DIR MODEL_PATH

Scenarios:
- `train`: 6 rollout steps with v = 5; writes, per process, what must agree across processes (buffers, counters,
  logs, the full weights), how many forward/backward passes it ran, and fingerprints of the full weights after
  every optimizer step and at every generation (taken inside the reward function, which every process calls).
- `resume`: 6 straight steps, then 3 steps with a checkpoint, then a resume for 3 more; then the same resume with
  the state file of process 1 corrupted, and once more with it missing. Writes the three runs' states and the
  errors.
- `resume_inside`: the same straight and resumed runs with two optimizer steps a rollout step, the checkpoint
  inside one.
- `failed_write`: process 1 cannot write its state file at the first checkpoint; the error each process raised.
- `reevaluate`: one prompt in B_bad, re-evaluated by more processes than it has prompts.
- `adaptive`: `train` with adaptive clipping, whose bounds every process must choose alike.
- `decoupled`: `train` with the decoupled correction, whose importance weights every process must log alike.
- `loss_metrics`: BAPO's own loss (OPMD), whose entropy and KL metrics must be means over every process's tokens.
- `fsdp1`: the trainer built under FSDP1, which must refuse the delayed rollout policy.
- `authors`: `train` with the authors' code's rules (`AUTHORS`), two optimizer steps a rollout step.
- `observe`: `train` evaluated and tracked every 2 steps, with buffer snapshots at every logging step and a
  checkpoint at the end: what each process measured and holds, to compare with the files process 0 wrote.

The engine is whatever the launcher configured (DDP, FSDP2, DeepSpeed ZeRO-2/3); FSDP2 through conftest's
`CPUFSDPTrainer`, which says what differs from a GPU run.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from conftest import CPUFSDPTrainer, StopAt, end_worker, make_config  # this script's folder is on sys.path
from datasets import Dataset
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from trl_bapo.checkpoint import state_file
from trl_bapo.snapshots import buffer_lines
from trl_bapo.tracking import PromptTracking

# Per rollout step, 6 prompts; k correct out of 4 before global step 3 and from then on. The last step has only
# homogeneous groups and (with a 1-step B_high) nothing to replay: its batch is empty.
STEPS = [
    {"a": (2, 2), "b": (0, 0), "c": (1, 1), "d": (4, 4), "e": (3, 3), "f": (0, 2)},
    {"g": (0, 2), "h": (2, 2), "i": (4, 4), "j": (0, 0), "k": (2, 2), "l": (1, 1)},
    {"m": (0, 0), "n": (3, 3), "o": (0, 3), "p": (4, 4), "q": (4, 4), "r": (2, 2)},
    {"s": (0, 0), "t": (4, 4), "u": (0, 0), "v": (4, 4), "w": (0, 0), "x": (4, 4)},
    {"y": (0, 0), "z": (1, 1), "ab": (0, 0), "ac": (1, 1), "ad": (4, 4), "ae": (1, 1)},
    {"af": (0, 0), "ag": (4, 4), "ah": (0, 0), "ai": (4, 4), "aj": (4, 4), "ak": (0, 0)},
]
PLAN = {f"{name}=": ks for step in STEPS for name, ks in step.items()}
SETTINGS = dict(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=3,  # 3 micro-batches per process, 6 in all, for batches of any size
    max_steps=len(STEPS),
    learning_rate=1e-2,
    weight_decay=0.1,  # so that an optimizer step on an empty batch would move the weights
    beta=0.01,
    rollout_delay=5,
    reevaluation_interval=2,
    high_quality_buffer_steps=1,
    high_quality_lower_range=[0.5, 0.5],
    high_quality_upper_range=[0.75, 0.75],
)


# recipes/bapo_authors.yaml's rules at this size: a shared store of 4 entries with 1 high-quality one, two optimizer
# steps a rollout step of 12 rows each (2 rows x 3 micro-batches x 2 processes), taken only as far as there are rows.
AUTHORS = dict(
    per_device_train_batch_size=2,
    steps_per_generation=6,
    max_steps=2 * len(STEPS),
    beta=0.0,
    rollout_delay=2,
    rollout_refresh_phase=1,
    shared_buffer=True,
    difficult_entry_after_update=True,
    difficult_buffer_size=4,
    high_quality_buffer_size=1,
    high_quality_lower_range=[0.25, 0.25],
    high_quality_upper_range=[0.75, 0.75],
    difficult_admission="improved_or_solved",
    keep_reevaluated_prompts=True,
    cap_difficult_replay=True,
    online_filter_fallback=True,
    off_policy_correction="decoupled",
    x3_anchor="stored",
    batch_aggregation="mini_batch",
)


def step_reward(prompts, completions, trainer_state, **kwargs):
    """First k completions of a prompt's group are right; k switches at global step 3 (same on every rank)."""
    seen, rewards = {}, []
    for prompt in prompts:
        k = PLAN[prompt][int(trainer_state.global_step >= 3)]
        rewards.append(float(seen.get(prompt, 0) < k))
        seen[prompt] = seen.get(prompt, 0) + 1
    return rewards


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """Every parameter whole, gathered with the engine's own call (a collective under FSDP2 and ZeRO-3)."""
    params = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    if trainer._dist.is_zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: param.detach().cpu().clone() for name, param in params.items()}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone() for n, p in params.items()}


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha1()
    for name in sorted(weights):
        digest.update(weights[name].float().numpy().tobytes())
    return digest.hexdigest()


def sharded_fraction(trainer) -> float:
    """Share of the trainable elements this process holds: 1 unsharded, about 1/processes sharded."""
    held = total = 0
    for param in trainer.accelerator.unwrap_model(trainer.model).parameters():
        if hasattr(param, "ds_tensor"):
            held, total = held + param.ds_tensor.numel(), total + param.ds_numel
        elif isinstance(param, DTensor):
            held, total = held + param.to_local().numel(), total + param.numel()
        else:
            held, total = held + param.numel(), total + param.numel()
    return held / total


class Fingerprints(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.trained = []  # trained[k]: after k optimizer steps

    def on_train_begin(self, args, state, control, **kwargs):
        self.trained.append(fingerprint(full_weights(self.trainer)))

    def on_step_end(self, args, state, control, **kwargs):
        self.trained.append(fingerprint(full_weights(self.trainer)))


def make_trainer(output_dir, model_path, **overrides):
    args = make_config(output_dir, **{**SETTINGS, **overrides})
    return CPUFSDPTrainer(
        model=model_path, reward_funcs=step_reward, args=args, train_dataset=Dataset.from_dict({"prompt": list(PLAN)})
    )


def bapo_state(trainer) -> dict:
    return {
        "difficult": list(trainer.bapo_status.difficult_prompts),
        "high_quality": [[g.prompt, g.step, g.accuracy] for g in trainer.bapo_status.high_quality_groups],
        "counters": [
            trainer._bapo.rollout_step,
            trainer._bapo.rollouts,
            trainer._bapo.reward_sum,
            trainer._bapo.reward_count,
        ],
        # Timings (bapo/*_seconds) are each process's own.
        "logs": [
            {k: v for k, v in e.items() if k.startswith("bapo/") and not k.endswith("_seconds")}
            for e in trainer.state.log_history
            if "bapo/x1" in e
        ],
    }


def train(output_dir: Path, model_path: str, **overrides) -> dict:
    trainer = make_trainer(output_dir, model_path, **overrides)
    passes, generations = [], []
    compute_loss = trainer.compute_loss

    def counting_compute_loss(model, inputs, *a, **k):
        passes.append(int((inputs["completion_mask"].sum(dim=1) > 0).sum()))  # rows that carry loss
        return compute_loss(model, inputs, *a, **k)

    def recording_reward(prompts, completions, trainer_state, **kwargs):
        # The first scoring of a step is its fresh rollout; a second one is the re-evaluation of B_bad.
        fresh = not generations or generations[-1][0] != trainer_state.global_step
        generations.append([trainer_state.global_step, fresh, fingerprint(full_weights(trainer))])
        return step_reward(prompts, completions, trainer_state, **kwargs)

    trainer.compute_loss = counting_compute_loss
    trainer.reward_funcs[0] = recording_reward
    prints = Fingerprints(trainer)
    trainer.add_callback(prints)
    trainer.train()
    torch.save(full_weights(trainer), output_dir / f"weights-{PartialState().process_index}.pt")
    return {
        **bapo_state(trainer),
        "passes": passes,
        "generations": generations,
        "trained": prints.trained,
        "sharded_fraction": sharded_fraction(trainer),
        "snapshot_elements": trainer._bapo.snapshot.num_elements(),
    }


class History(TrainerCallback):
    """Buffers, counters and a fingerprint of the weights after every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        recorded = bapo_state(self.trainer)
        del recorded["logs"]
        self.steps[state.global_step] = {**recorded, "weights": fingerprint(full_weights(self.trainer))}


def straight_and_resumed(output_dir: Path, model_path: str, **overrides) -> tuple[dict, Path]:
    """6 straight steps, and 3 steps with a checkpoint then 3 resumed: the histories of both, and the checkpoint."""
    straight = make_trainer(output_dir / "straight", model_path, **overrides)
    straight_history = History(straight)
    straight.add_callback(straight_history)
    straight.train()
    split = make_trainer(output_dir / "split", model_path, save_strategy="steps", save_steps=3, **overrides)
    split.add_callback(StopAt(3))
    split.train()
    checkpoint = output_dir / "split" / "checkpoint-3"
    resumed = make_trainer(output_dir / "split", model_path, **overrides)
    resumed_history = History(resumed)
    resumed.add_callback(resumed_history)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    return {"straight": straight_history.steps, "resumed": resumed_history.steps}, checkpoint


def failed_write(output_dir: Path, model_path: str) -> dict:
    """Process 1 cannot write its state file at the first checkpoint: both processes must stop, promptly, with the
    same error naming the file (before, process 0 waited at the checkpoint's next collective until it timed out)."""
    from trl_bapo import checkpoint

    class FullDisk:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def save(value, path, *args, **kwargs):
            raise OSError(28, "No space left on device")

    if os.environ["RANK"] == "1":  # set by the launcher; PartialState is not built before the trainer
        checkpoint.torch = FullDisk()
    trainer = make_trainer(output_dir, model_path, save_strategy="steps", save_steps=1, max_steps=2)
    try:
        trainer.train()
    except RuntimeError as error:
        return {"error": str(error), "step": trainer.state.global_step}
    return {"error": None, "step": trainer.state.global_step}


def resume(output_dir: Path, model_path: str) -> dict:
    result, checkpoint = straight_and_resumed(output_dir, model_path)
    rank = PartialState().process_index
    if rank == 1:
        Path(state_file(str(checkpoint), rank)).write_bytes(b"corrupted")
    PartialState().wait_for_everyone()
    result["corrupt_error"] = resume_error(output_dir, model_path, checkpoint)
    if rank == 1:
        Path(state_file(str(checkpoint), rank)).unlink()
    PartialState().wait_for_everyone()
    result["missing_error"] = resume_error(output_dir, model_path, checkpoint)
    return result


def observe(output_dir: Path, model_path: str) -> dict:
    args = make_config(
        output_dir,
        **SETTINGS,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=8,
        track_prompts=True,
        log_buffer_snapshots=True,
        save_strategy="steps",
        save_steps=len(STEPS),
    )
    prompts = Dataset.from_dict({"prompt": list(PLAN)})
    held_out = prompts.select(range(6))
    trainer = CPUFSDPTrainer(model_path, step_reward, args, train_dataset=prompts, eval_dataset=held_out)
    trainer.train()
    tracking = next(c for c in trainer.callback_handler.callbacks if isinstance(c, PromptTracking))
    lines = buffer_lines(trainer._bapo)
    return {**bapo_state(trainer), "tracking": tracking.records, "buffers": lines}


def resume_error(output_dir: Path, model_path: str, checkpoint: Path) -> str | None:
    try:
        make_trainer(output_dir / "split", model_path).train(resume_from_checkpoint=str(checkpoint))
    except ValueError as error:
        return str(error)
    return None


def loss_metrics(output_dir: Path, model_path: str) -> dict:
    """OPMD with the behavior-policy KL (bias-corrected, TRL's default): per micro-batch, the entropy and KL the
    trainer logged, and both computed
    here from a forward pass of this test's own, as means over the tokens of both processes and as the mean of
    each process's mean."""
    trainer = make_trainer(
        output_dir, model_path, loss_type="opmd", max_steps=3, bf16=False, use_bias_correction_kl=True
    )
    recorded = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *a, **k):
        loss = compute_loss(model, inputs, *a, **k)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        width, mask = inputs["completion_ids"].shape[1], inputs["completion_mask"].float()
        with torch.no_grad():
            logits = policy(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        current = logp.gather(2, inputs["completion_ids"].unsqueeze(2))[..., 0]
        log_ratio = inputs["ref_per_token_logps"] - current
        kl = (torch.exp(log_ratio) - log_ratio - 1) * torch.exp(current - inputs["old_per_token_logps"])
        values = {"entropy": -(logp.exp() * logp).sum(-1), "kl": kl}
        for name, value in values.items():
            sums = torch.stack([(value * mask).sum(), mask.sum()])
            local_mean = sums[0] / sums[1].clamp(min=1)
            totals = trainer.accelerator.reduce(sums, reduction="sum")
            recorded.append(
                {
                    "name": name,
                    "logged": trainer._metrics["train"][name][-1],
                    "tokens": totals[0].item() / totals[1].clamp(min=1).item(),
                    "processes": trainer.accelerator.gather(local_mean.unsqueeze(0)).mean().item(),
                }
            )
        return loss

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return {"metrics": recorded}


def fsdp1(output_dir: Path, model_path: str) -> dict:
    """Builds the trainer with the paper's v = 5 under FSDP1, which cannot hold a delayed policy: the error."""
    try:
        make_trainer(output_dir, model_path)
    except NotImplementedError as error:
        return {"error": str(error), "fsdp_version": AcceleratorState().fsdp_plugin.fsdp_version}
    return {"error": None}


def reevaluate(output_dir: Path, model_path: str) -> dict:
    # "a=" is the one difficult prompt of step 1 (0/4); from global step 1 on it is 2/4, so re-evaluation at step 2
    # moves it to X2. The other prompts never enter B_bad.
    plan = {"a=": 0, "b=": 2, "c=": 4, "d=": 1, "e=": 3, "f=": 4}

    def reward(prompts, completions, trainer_state, **kwargs):
        rewards, seen = [], {}
        for prompt in prompts:
            k = 2 if prompt == "a=" and trainer_state.global_step > 0 else plan[prompt]
            rewards.append(float(seen.get(prompt, 0) < k))
            seen[prompt] = seen.get(prompt, 0) + 1
        return rewards

    args = make_config(output_dir, **{**SETTINGS, "max_steps": 2, "gradient_accumulation_steps": 2})
    trainer = CPUFSDPTrainer(
        model=model_path, reward_funcs=reward, args=args, train_dataset=Dataset.from_dict({"prompt": list(plan) * 2})
    )
    trainer.train()
    return bapo_state(trainer)


if __name__ == "__main__":
    scenario, output, model = sys.argv[1:]
    scenarios = {
        "train": train,
        "resume": resume,
        "reevaluate": reevaluate,
        "adaptive": lambda out, path: train(out, path, loss_type="bnpo", adaptive_clipping=True),
        "decoupled": lambda out, path: train(
            out, path, off_policy_correction="decoupled", importance_sampling_cap=1.05
        ),
        "loss_metrics": loss_metrics,
        "fsdp1": fsdp1,
        "observe": observe,
        "authors": lambda out, path: train(out, path, **AUTHORS),
        # Two optimizer steps a rollout step: the checkpoint at step 3 falls inside rollout step 2.
        "resume_inside": lambda out, path: straight_and_resumed(out, path, steps_per_generation=6)[0],
        "failed_write": failed_write,
    }
    result = scenarios[scenario](Path(output), model)
    (Path(output) / f"{scenario}-{PartialState().process_index}.json").write_text(json.dumps(result))
    end_worker()
