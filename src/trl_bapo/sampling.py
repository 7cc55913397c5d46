"""Per-step sampling seeds (`rollout_sampling_seed="per_step"`): each engine call samples from a generator of its own,
seeded by (seed, rollout step, optimizer step, process, call), so a rollout no longer depends on what else drew from
the global random state (dropout, evaluation, gradient checkpointing's recomputation), nor on when it runs.

transformers' `generate` samples with the global generator (`torch.multinomial` in its sampling loop) and takes no
generator of its own. Here it decodes greedily over scores that `StepSampler` has already reduced to the one token it
drew with its own generator, after the temperature, top-k, top-p and min-p that sampling would apply. Generation
then runs with dropout off (the model in eval mode), since dropout would draw from the global generator too. vLLM
takes the seed per request (its `n` samples of a prompt get seed, seed + 1, ...). Either way the trainer's own call
is TRL's `_generate_single_turn`, run on a shallow copy of the trainer whose generation settings carry the seed.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from trl import GRPOTrainer


def step_seed(seed: int, rollout_step: int, global_step: int, process: int, call: int) -> int:
    """A 63-bit seed for one engine call, the same in any process and any run with these numbers."""
    digest = hashlib.sha256(f"{seed}/{rollout_step}/{global_step}/{process}/{call}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StepSampler(LogitsProcessor):
    """Draws each next token with its own generator from the warped distribution, and leaves it the only token with a
    finite score, so that greedy decoding picks it."""

    def __init__(self, generator: torch.Generator, warpers: LogitsProcessorList):
        self.generator, self.warpers = generator, warpers

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)
        token = torch.multinomial(probs.cpu(), 1, generator=self.generator).to(scores.device)
        return torch.full_like(scores, -torch.inf).scatter_(1, token, 0.0)


def warpers(generation_kwargs: dict) -> LogitsProcessorList:
    """The warpers transformers' sampling applies, in its order (transformers 5.23, `_get_logits_processor`)."""
    found = LogitsProcessorList()
    temperature, top_k = generation_kwargs.get("temperature"), generation_kwargs.get("top_k")
    top_p, min_p = generation_kwargs.get("top_p"), generation_kwargs.get("min_p")
    if temperature is not None and temperature != 1.0:
        found.append(TemperatureLogitsWarper(temperature))
    if top_k:
        found.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        found.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        found.append(MinPLogitsWarper(min_p))
    return found


class SamplingSeeds:
    """Numbers the engine calls of each (rollout step, optimizer step) and gives each its seed."""

    def __init__(self, seed: int, process: int):
        self.seed, self.process = seed, process
        self._at: tuple[int, int] | None = None
        self._calls = 0

    def next(self, rollout_step: int, global_step: int) -> int:
        if self._at != (rollout_step, global_step):
            self._at, self._calls = (rollout_step, global_step), 0
        self._calls += 1
        return step_seed(self.seed, rollout_step, global_step, self.process, self._calls - 1)

    def first(self, rollout_step: int, global_step: int) -> int:
        """The seed of the first call at these steps, without counting a call (what a prefetch samples with)."""
        return step_seed(self.seed, rollout_step, global_step, self.process, 0)


def seeded_trainer(trainer: GRPOTrainer, seed: int, model: torch.nn.Module | None = None) -> GRPOTrainer:
    """A shallow copy of `trainer` whose engine call samples with `seed` (and generates with `model`, a replica, when
    given); everything else, the engine and the tokenizer included, is the trainer's."""
    seeded = copy.copy(trainer)
    if model is not None:
        seeded.model = seeded.model_wrapped = model
    if trainer.use_vllm:
        seeded.vllm_generation = copy.copy(trainer.vllm_generation)
        seeded.vllm_generation.generation_kwargs = {**trainer.vllm_generation.generation_kwargs, "seed": seed}
        seeded._last_loaded_step = trainer.state.global_step  # BAPO has sent the engine its weights already
        return seeded
    sampling = {key: trainer.generation_kwargs.get(key) for key in ("temperature", "top_k", "top_p", "min_p")}
    greedy = {**trainer.generation_kwargs, "do_sample": False, **dict.fromkeys(sampling)}
    seeded.generation_kwargs = greedy
    seeded.generation_config = GenerationConfig(**greedy, disable_compile=True)
    seeded._step_sampler = StepSampler(torch.Generator().manual_seed(seed), warpers(sampling))
    return seeded


@contextmanager
def sampling_with_own_generator(seeded: GRPOTrainer) -> Iterator[None]:
    """Around an engine call of a `seeded_trainer`: transformers' `generate` takes the step's sampler, and the model
    generates with dropout off."""
    if seeded.use_vllm:
        yield
        return
    model = seeded.accelerator.unwrap_model(seeded.model_wrapped)
    was_training = model.training
    generate = type(model).generate

    def with_sampler(*args, **kwargs):
        return generate(model, *args, logits_processor=LogitsProcessorList([seeded._step_sampler]), **kwargs)

    model.generate = with_sampler
    model.eval()
    try:
        yield
    finally:
        del model.generate
        model.train(was_training)


def engine_call(
    seeded: GRPOTrainer, prompt_ids, images, multimodal_fields, num_generations: int, has_tool_images: bool = False
) -> tuple:
    """TRL's engine call (trl 1.16.0, `GRPOTrainer._generate_single_turn`) on a `seeded_trainer`: completion ids and
    the engine's log-probs."""
    with sampling_with_own_generator(seeded):
        return GRPOTrainer._generate_single_turn(
            seeded, prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
