"""Trains BAPO in every process of `accelerate launch --num_processes 2`; run by test_distributed.py.

Writes, per process, what must agree across processes: final weights, buffer contents, counters, and how many
forward/backward passes the process ran.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset

from trl_bapo import BAPOTrainer

from conftest import make_config  # this script's folder is on sys.path when it runs

# Per rollout step, 6 prompts; k correct out of 4 before global step 3 and from then on. The last step has
# only homogeneous groups and (with a 1-step B_high) nothing to replay: its batch is empty.
STEPS = [
    {"a": (2, 2), "b": (0, 0), "c": (1, 1), "d": (4, 4), "e": (3, 3), "f": (0, 2)},
    {"g": (0, 2), "h": (2, 2), "i": (4, 4), "j": (0, 0), "k": (2, 2), "l": (1, 1)},
    {"m": (0, 0), "n": (3, 3), "o": (0, 3), "p": (4, 4), "q": (4, 4), "r": (2, 2)},
    {"s": (0, 0), "t": (4, 4), "u": (0, 0), "v": (4, 4), "w": (0, 0), "x": (4, 4)},
    {"y": (0, 0), "z": (4, 4), "ab": (0, 0), "ac": (4, 4), "ad": (4, 4), "ae": (0, 0)},
]
PLAN = {f"{name}=": ks for step in STEPS for name, ks in step.items()}


def step_reward(prompts, completions, trainer_state, **kwargs):
    """First k completions of a prompt's group are right; k switches at global step 3 (same on every rank)."""
    seen, rewards = {}, []
    for prompt in prompts:
        k = PLAN[prompt][int(trainer_state.global_step >= 3)]
        rewards.append(float(seen.get(prompt, 0) < k))
        seen[prompt] = seen.get(prompt, 0) + 1
    return rewards


def main(output_dir: str, model_path: str) -> None:
    args = make_config(
        output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,  # 3 micro-batches per process, 6 in all, for batches of any size
        max_steps=len(STEPS),
        learning_rate=1e-2,
        beta=0.01,
        rollout_delay=2,
        reevaluation_interval=2,
        high_quality_buffer_steps=1,
        high_quality_lower_range=[0.5, 0.5],
        high_quality_upper_range=[0.75, 0.75],
    )
    trainer = BAPOTrainer(
        model=model_path, reward_funcs=step_reward, args=args, train_dataset=Dataset.from_dict({"prompt": list(PLAN)})
    )
    passes = []
    compute_loss = trainer.compute_loss

    def counting_compute_loss(model, inputs, *a, **k):
        passes.append(int((inputs["completion_mask"].sum(dim=1) > 0).sum()))  # rows that carry loss
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = counting_compute_loss
    trainer.train()
    rank = PartialState().process_index
    torch.save({n: p.detach().cpu() for n, p in trainer.model.named_parameters()}, Path(output_dir) / f"weights-{rank}.pt")
    logs = [
        {k: v for k, v in e.items() if k.startswith("bapo/") and k != "bapo/assembly_seconds"}
        for e in trainer.state.log_history
        if "bapo/x1" in e
    ]
    result = {
        "passes": passes,
        "difficult": trainer._difficult.prompts(),
        "high_quality": [[g.prompt, g.step, g.accuracy] for g in trainer._high_quality.groups()],
        "counters": [trainer._rollout_step, trainer._rollouts, trainer._reward_sum, trainer._reward_count],
        "logs": logs,
    }
    (Path(output_dir) / f"rank-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
