"""BAPO with a real colocated vLLM engine in each of 2 processes (`accelerate launch --multi_gpu`, gloo on CPU).

Run by test_two_processes.py. Each process writes the global steps its engine was sent weights at, whether its
engine held alpha at every fresh rollout, its buffers and counters, and a fingerprint of its final weights.
"""

import hashlib
import json
import sys
from pathlib import Path

from accelerate import PartialState
from conftest import CPUFSDPTrainer, ScriptedReward, bapo_logs, end_worker, make_config, prompt_dataset
from engine import COLOCATE, EngineRecorder, WeightHistory, weight_layout

KS = [[2], [3], [0, 2], [1], [0], [4], [2], [1]]
PLAN = {f"{t}{name}=": ks for t in range(8) for name, ks in zip("abcdefgh", KS)}


def main(output_dir: str, model_path: str) -> None:
    # The paper's v = m = 5.
    args = make_config(
        output_dir, max_steps=6, rollout_delay=5, reevaluation_interval=5, learning_rate=5e-2, **COLOCATE
    )
    trainer = CPUFSDPTrainer(
        model=model_path, reward_funcs=ScriptedReward(PLAN), args=args, train_dataset=prompt_dataset(list(PLAN))
    )
    engine, history = EngineRecorder(trainer), WeightHistory(trainer)
    trainer.add_callback(history)
    trainer.train()
    refreshed_at = {1: 1, 2: 1, 3: 1, 4: 1, 5: 5, 6: 5}
    fresh = {}
    for call in engine.calls:
        fresh.setdefault(call["step"], call)
    weights = history.after[-1]
    result = {
        "syncs": engine.syncs,
        "alpha_held": [engine.holds(call, history.after[refreshed_at[s + 1] - 1]) for s, call in fresh.items()],
        "current_held": [engine.holds(call, history.after[s]) for s, call in fresh.items()],
        "difficult": list(trainer.bapo_status.difficult_prompts),
        "high_quality": [[g.prompt, g.step, g.accuracy] for g in trainer.bapo_status.high_quality_groups],
        "logs": [{k: v for k, v in e.items() if k.startswith("bapo/") and "sec" not in k} for e in bapo_logs(trainer)],
        "sharded": trainer.is_fsdp_enabled,
        "weights": hashlib.sha1(b"".join(weights[n].numpy().tobytes() for n in sorted(weights))).hexdigest(),
    }
    (Path(output_dir) / f"rank-{PartialState().process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    with weight_layout("packed"):  # linear weights as vLLM's CPU build stores them on AVX-512 and AMX (engine.py)
        main(*sys.argv[1:])
    end_worker()
