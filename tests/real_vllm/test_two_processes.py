"""Two processes, each with its own colocated vLLM engine, over gloo on CPU, under DDP and FSDP2: BAPO's decisions
and vLLM's delayed weights stay in lockstep (vLLM's external launcher runs on CPU)."""

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from conftest import accelerate_settings
from engine import build_vllm_model

WORKER = Path(__file__).with_name("two_process_worker.py")
ENGINES = {
    "ddp": ["--multi_gpu"],
    "fsdp2": ["--config_file", str(resources.files("trl.accelerate_configs") / "fsdp2.yaml")],  # TRL's own
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_colocated_engines_hold_alpha_in_lockstep(engine, tmp_path):
    model_path = build_vllm_model(tmp_path / "model")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *ENGINES[engine],
        *accelerate_settings(2),
        str(WORKER),
        str(tmp_path),
        str(model_path),
    ]
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # The worker's folder and the suite's (tests/conftest.py) are both on its path.
    environment["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent), str(WORKER.parents[1])])
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["sharded"] == (engine == "fsdp2")
    assert ranks[0]["syncs"] == [0, 4]  # t = 1 and 5 with v = 5
    assert all(ranks[0]["alpha_held"]), ranks[0]["alpha_held"]
    assert ranks[0]["current_held"] == [True, False, False, False, True, False]  # stale rollouts at t = 2-4, 6
    logs = ranks[0]["logs"]
    assert [log["bapo/policy_lag"] for log in logs] == [0, 1, 2, 3, 0, 1]
    assert sum(log["bapo/x2"] for log in logs) > 0
