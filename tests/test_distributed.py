"""Two processes on CPU (`accelerate launch --num_processes 2`): BAPO end to end, ranks in lockstep."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("distributed_worker.py")


def test_two_processes_agree_on_buffers_passes_and_weights(tiny_model_path, tmp_path):
    # accelerate starts several processes only through its multi-GPU launcher; without GPUs they run on the
    # CPU over gloo (MULTI_CPU).
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(WORKER), str(tmp_path), tiny_model_path,
    ]
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # Bounded: a rank waiting on a collective the other never enters would hang here, not pass.
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(tmp_path / f"weights-{r}.pt") for r in range(2)]
    for key in ("difficult", "high_quality", "counters", "logs"):
        assert ranks[0][key] == ranks[1][key], key
    assert len(ranks[0]["passes"]) == len(ranks[1]["passes"]) == 5 * 3
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name

    logs = ranks[0]["logs"]
    sizes = [log["bapo/x1"] + log["bapo/x2"] + log["bapo/x3"] for log in logs]
    assert any(size % 2 for size in sizes), f"no odd-sized batch: {sizes}"
    assert logs[-1]["bapo/skipped"] == 1, "the last step was meant to be empty"
    assert sum(log["bapo/x2"] for log in logs) > 0 and sum(log["bapo/x3"] for log in logs) > 0
    # Every row is trained exactly once across the two ranks: per step, the rows with loss add up to the batch.
    rows = [a + b for a, b in zip(ranks[0]["passes"], ranks[1]["passes"])]
    assert [sum(rows[3 * t : 3 * t + 3]) for t in range(5)] == [size * 4 for size in sizes]
