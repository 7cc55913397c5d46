"""How BAPO sends the policy's weights to TRL's vLLM engine.

TRL's colocated sync (trl 1.16.0, `VLLMGeneration.sync_weights`) copies each parameter into the engine with the
model's `load_weights`, which needs every layer's weight in its checkpoint layout. vLLM's CPU build does not keep that
layout on every processor: where it packs a linear layer's weight for oneDNN (AVX-512) or its AMX kernel, it then
replaces `layer.weight` with an empty parameter (`dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`), and
`load_weights` fails. vLLM's own route for new weights into a processed model is the worker's `reload_weights`, a
layerwise reload that restores each layer's checkpoint layout, loads into it and processes it again; it works
whichever layout the engine chose, so BAPO uses it on every processor and on GPUs alike.

One layer needs more (checked against vLLM 0.31): an LM head tied to the input embedding gets no weights of its own
in the reload, so the reload does not process it again, and on those processors it would go on computing the logits
with the copy packed from the weights it was first loaded with. It is processed again after the reload.

TRL's sync stays where it is the right one: in server mode the weights go to the server over NCCL, and with sleep mode
(CUDA only, where weights keep their layout) TRL wakes the engine's weights up before it loads them. With a PEFT model
and a server that serves LoRA, no weights are sent at all: the server loads adapters by file, and each generation
names the one it uses (`trl_bapo.lora_sync`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers.utils import logging
from trl.generation.vllm_generation import VLLMGeneration

from trl_bapo.lora_sync import ServerAdapters

logger = logging.get_logger(__name__)


class EngineWeights:
    """Which weights TRL's vLLM engine generates with, and when it gets new ones. Rollouts generate with alpha: the
    engine gets it on refresh steps (line 5 of Algorithm 1) and wherever it lost it (the first step of a (re)started
    engine, after a re-evaluation off the refresh schedule, after an evaluation). Re-evaluation, evaluation and prompt
    tracking generate with the current weights. On a server that loads adapters (`adapters`), the engine loses
    nothing: alpha's adapter and the current weights' are loaded when first needed, and each generation names its
    own. TRL's engine call would sync whenever the optimizer has stepped (`_last_loaded_step`); BAPO tells it the
    engine is up to date. With per-step seeds the call runs on an `engine_view` (`trl_bapo.sampling`), whose state is
    frozen at its step and whose `_last_loaded_step` is that step, so it never syncs, a background call whose
    optimizer step ended before it started included; its sampling settings, the adapter's name among them, are
    copied when it is made."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.holds_alpha = False  # a (re)started engine holds the base model
        generation = getattr(trainer, "vllm_generation", None)
        self.adapters = (
            ServerAdapters(generation, trainer.args.output_dir) if getattr(generation, "adapter_sync", False) else None
        )
        if self.adapters is not None and trainer.rollout_func is not None:
            logger.warning(
                "rollout_func with a LoRA adapter on the vLLM server: BAPO names alpha's adapter in "
                "trainer.vllm_generation.generation_kwargs['model']; a rollout_func that sends its own requests must "
                "pass that name as the request's model, or the server generates with the base model."
            )

    def alpha(self, policy: torch.nn.Module, t: int, refreshed: bool) -> None:
        """Before rollout step t's generation (nothing to do without vLLM)."""
        trainer = self.trainer
        if not trainer.use_vllm:
            return
        snapshot = trainer._bapo.snapshot
        if self.adapters is not None:
            # Loaded at its refresh, or at a resumed run's first rollout step.
            name = self.adapters.name("alpha", snapshot.step)
            if not self.adapters.holds(name):
                with snapshot.applied(policy, t):
                    self.adapters.load("alpha", name, policy)
            self.adapters.select(name)
        elif refreshed or not self.holds_alpha:
            with snapshot.applied(policy, t):
                send_weights(trainer.vllm_generation)
            self.holds_alpha = True
        trainer._last_loaded_step = trainer.state.global_step

    def current(self, alpha_is_current: bool = False) -> None:
        """Before a generation with the current weights; `alpha_is_current` where alpha equals them (refreshed at
        this rollout step, before any update)."""
        trainer = self.trainer
        if not trainer.use_vllm:
            return
        if self.adapters is not None:
            if not alpha_is_current:  # else alpha's adapter, which this rollout step's generation named, serves
                name = self.adapters.name("current", trainer.state.global_step)
                if not self.adapters.holds(name):
                    self.adapters.load("current", name, trainer.accelerator.unwrap_model(trainer.model))
                self.adapters.select(name)
            trainer._last_loaded_step = trainer.state.global_step
            return
        if self.holds_alpha and alpha_is_current:
            return
        if self.holds_alpha or trainer._last_loaded_step != trainer.state.global_step:
            send_weights(trainer.vllm_generation)
            trainer._last_loaded_step = trainer.state.global_step
            self.holds_alpha = False

    def close(self) -> None:
        """At the end of training: the server's adapters of this run are unloaded (loaded again if needed later)."""
        if self.adapters is not None:
            self.adapters.close()


def send_weights(generation: VLLMGeneration) -> None:
    """Sends the weights now in the trainer's model to TRL's vLLM engine: all of them, gathered from shards and with
    PEFT adapters merged (TRL's own walk over the parameters)."""
    if generation.mode != "colocate" or generation.enable_sleep_mode:
        generation.sync_weights()
        return
    generation.llm.collective_rpc(_reload, args=(_owned(generation),))
    generation.llm.reset_prefix_cache()


def _owned(generation: VLLMGeneration) -> Iterator[tuple[str, torch.Tensor]]:
    # The layerwise reload holds a layer's tensors until the layer is complete (q, k and v for qkv_proj), while TRL's
    # walk lends each gathered tensor only until its next step (ZeRO-3 partitions it again), so each is copied.
    for name, tensor in generation._iter_named_params():
        yield name, tensor.detach().clone()


def _reload(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Runs in the engine's worker (colocated: this process)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    holders = set()
    for module in worker.model_runner.get_model().modules():
        if not isinstance(module, VocabParallelEmbedding):
            continue
        if id(module.weight) in holders and isinstance(module.quant_method, UnquantizedEmbeddingMethod):
            module.quant_method.process_weights_after_loading(module)  # a tied head: see the module's docstring
        holders.add(id(module.weight))
