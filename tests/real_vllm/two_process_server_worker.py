"""BAPO with a LoRA adapter on a real vLLM server from 2 processes under FSDP2 (`accelerate launch`, gloo on CPU).

Run by test_server.py. Each process writes the adapters it loaded, whether it holds a client of the server, its
counters, and, after the optimizer step alpha is refreshed from, the adapter's weights gathered whole from both
processes' shards: what the adapter file written at the next refresh must hold.
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from conftest import CPUFSDPTrainer, ScriptedReward, bapo_logs, end_worker, make_config, prompt_dataset
from engine import LORA
from peft import LoraConfig
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

PLAN = {f"{t}{name}=": ks for t in range(8) for name, ks in zip("abcdefgh", [[2], [3], [0, 2], [1]] * 2)}


class GatheredAdapter(TrainerCallback):
    """The adapter's weights after optimizer step `step`, gathered whole (a collective: every process records)."""

    def __init__(self, trainer, step: int):
        self.trainer, self.step, self.weights = trainer, step, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        for name, param in self.trainer.model.named_parameters():
            if "lora_" in name:
                whole = param.full_tensor() if isinstance(param, DTensor) else param
                self.weights[name.replace(".default", "")] = whole.detach().flatten().tolist()


def main(output_dir: str, model_path: str, url: str) -> None:
    args = make_config(
        output_dir,
        max_steps=4,
        rollout_delay=3,
        reevaluation_interval=2,
        learning_rate=5e-2,
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=url,
    )
    trainer = CPUFSDPTrainer(
        model=model_path,
        reward_funcs=ScriptedReward(PLAN),
        args=args,
        train_dataset=prompt_dataset(list(PLAN)),
        peft_config=LoraConfig(**LORA),
    )
    adapters, loads = trainer._engine.adapters, []
    load = adapters.load

    def recording_load(kind, name, model):
        loads.append(name)
        load(kind, name, model)

    adapters.load = recording_load
    alpha = GatheredAdapter(trainer, step=2)  # alpha of t = 3: the policy after 2 optimizer steps
    trainer.add_callback(alpha)
    trainer.train()
    result = {
        "loads": loads,
        "run": adapters.run,
        "talks_to_server": hasattr(adapters, "_client"),
        "sharded": trainer.is_fsdp_enabled,
        "alpha_t3": alpha.weights,
        "logs": [{k: v for k, v in e.items() if k.startswith("bapo/") and "sec" not in k} for e in bapo_logs(trainer)],
    }
    (Path(output_dir) / f"rank-{PartialState().process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
    end_worker()
