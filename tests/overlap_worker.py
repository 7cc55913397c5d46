"""Trains the same run without and with `overlap_rollout` in every process of `accelerate launch` (DDP); run by
test_overlap.py.

    accelerate launch --multi_gpu overlap_worker.py OUTPUT_DIR MODEL_PATH

Writes, per process and run, what must be equal: the weights' fingerprint, every completion the reward scored, the
logs without timings, BAPO's status; and whether each rollout step was prefetched.
"""

import hashlib
import json
import sys
from pathlib import Path

from conftest import end_worker, make_config, prompt_dataset  # this script's folder is on sys.path
from test_overlap import PROMPTS, LengthParity, compared_logs

from trl_bapo import BAPOTrainer


def main(out: Path, model: str) -> None:
    for mode in ("sync", "overlap"):
        reward = LengthParity()
        args = make_config(
            out / mode,
            per_device_train_batch_size=4,
            rollout_delay=3,
            max_steps=6,
            rollout_sampling_seed="per_step",
            overlap_rollout=mode == "overlap",
        )
        trainer = BAPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompt_dataset(PROMPTS))
        trainer.train()
        weights = hashlib.sha256()
        for name, param in sorted(trainer.model.named_parameters()):
            weights.update(name.encode() + param.detach().cpu().numpy().tobytes())
        record = {
            "weights": weights.hexdigest(),
            "completions": reward.completions,
            "logs": compared_logs(trainer),
            "status": repr(trainer.bapo_status),
            "prefetched": [
                entry["bapo/prefetched"] for entry in trainer.state.log_history if "bapo/prefetched" in entry
            ],
        }
        rank = trainer.accelerator.process_index
        (out / f"{mode}-{rank}.json").write_text(json.dumps(record))
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    end_worker()
