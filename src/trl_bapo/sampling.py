"""Per-step sampling seeds (`rollout_sampling_seed="per_step"`): each engine call samples from a generator of its own,
seeded by (seed, rollout step, optimizer step, process, call), so a rollout no longer depends on what else drew from
the global random state (dropout, evaluation, gradient checkpointing's recomputation), nor on when it runs. A draw
that must be the same every time it is made (prompt tracking's measurement) takes its seeds from a fixed sequence,
(seed, its name, process, call), whatever the steps.

transformers' `generate` samples with the global generator (`torch.multinomial` in its sampling loop) and takes no
generator of its own. Here it decodes greedily over scores that `StepSampler` has already reduced to the one token it
drew with its own generator, after the temperature, top-k, top-p and min-p that sampling would apply; the logits
processors generate applies whether it samples or not (repetition penalty, suppressed or bad words, minimum length)
come before it. Sampling settings it cannot apply are refused at construction (`check_step_sampling`). Generation
then runs with dropout off (the model in eval mode), since dropout would draw from the global generator too. vLLM
takes the seed per request (its `n` samples of a prompt get seed, seed + 1, ...).

Either way the call is TRL's `_generate_single_turn`, run on an `engine_view`: what the call reads, given to it
explicitly, with a state no update moves. It never sends the engine weights (BAPO does, before the call), and
a background call holds nothing that training changes.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from trl import GRPOTrainer

# What TRL's engine call reads from the trainer (trl 1.16.0, `GRPOTrainer._generate_single_turn`, with transformers
# 5.23's `Trainer._prepare_inputs`, which it calls), besides what `engine_view` gives it of its own.
ENGINE_CALL_ATTRIBUTES = (
    "accelerator",
    "args",
    "is_deepspeed_enabled",
    "_dist",
    "_tokenizer",
    "use_vllm",
    "use_transformers_continuous_batching",
    "continuous_batching_config",
    "pad_to_multiple_of",
    "eos_token_ids",
    "_is_vlm",
    "tools",
    "_image_pad_token_id",
    "_video_pad_token_id",
)

# generation_kwargs that transformers' sampling applies and `StepSampler` does not (transformers 5.23,
# `_get_logits_processor`): warpers it adds only when it samples itself, and watermarking, which comes after the
# sampler has chosen the token. Each with the values that change anything.
UNAPPLIED = {
    "typical_p": lambda value: value is not None and value < 1.0,
    "epsilon_cutoff": lambda value: value is not None and 0.0 < value < 1.0,
    "eta_cutoff": lambda value: value is not None and 0.0 < value < 1.0,
    "top_h": lambda value: value is not None,
    "watermarking_config": lambda value: value is not None,
}
# generation_kwargs that choose how generate decodes (transformers 5.23, `GenerationConfig.get_generation_mode`).
DECODING_KWARGS = (
    "do_sample",
    "num_beams",
    "num_beam_groups",
    "penalty_alpha",
    "constraints",
    "force_words_ids",
    "use_mtp",
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
    "dola_layers",
)


def _seed(*parts: int | str) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_seed(seed: int, rollout_step: int, global_step: int, process: int, call: int) -> int:
    """A 63-bit seed for one engine call, the same in any process and any run with these numbers."""
    return _seed(seed, rollout_step, global_step, process, call)


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

    def draw(self, name: str) -> Iterator[int]:
        """The seeds of the engine calls of a draw named `name`, in order: the same whenever the draw is made, and
        apart from every step's."""
        return (_seed(self.seed, name, self.process, call) for call in itertools.count())


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


# Values of sampling settings that change nothing, as transformers' `_get_logits_processor` skips them.
NEUTRAL = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
MODEL_FILLED = ("top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h", "repetition_penalty")


def model_sampling(trainer: GRPOTrainer) -> dict[str, Any]:
    """The sampling settings transformers' generate takes from the model's own `generation_config.json` because TRL
    leaves them unset (None; trl 1.16.0 leaves `min_p` unset by default and never sets `typical_p`): they apply to
    every rollout on transformers' generate, where no config field shows them."""
    if trainer.use_vllm:
        return {}
    model_config = getattr(trainer.accelerator.unwrap_model(trainer.model), "generation_config", None)
    filled = {}
    for key in MODEL_FILLED:
        value = getattr(model_config, key, None)
        if trainer.generation_kwargs.get(key) is None and value is not None and value != NEUTRAL.get(key, 1.0):
            filled[key] = value
    return filled


def check_step_sampling(trainer: GRPOTrainer) -> None:
    """Refuses, with per-step seeds on transformers' generate, the generation settings the step sampler would drop:
    whatever makes generate decode otherwise than by sampling, and the warpers it does not apply. vLLM applies its
    settings itself."""
    if trainer.args.rollout_sampling_seed != "per_step" or trainer.use_vllm:
        return
    from_model = model_sampling(trainer)
    kwargs = {**trainer.generation_kwargs, **from_model}  # TRL's, the config's over them, the model's where unset
    dropped = [
        f"{'the model generation_config.json' if key in from_model else 'generation_kwargs'}[{key!r}]={kwargs[key]!r}"
        for key, drops in UNAPPLIED.items()
        if drops(kwargs.get(key))
    ]
    if dropped:
        raise ValueError(
            f"{', '.join(dropped)} is not applied with rollout_sampling_seed='per_step', whose sampler draws each "
            "token after temperature, top_k, top_p and min_p only. Remove it from generation_kwargs (or from the "
            "model's generation_config), or set rollout_sampling_seed='global' (which also rules out "
            "overlap_rollout)."
        )
    mode = trainer.generation_config.get_generation_mode()
    if mode != GenerationMode.SAMPLE:
        given = trainer.args.generation_kwargs or {}
        decoding = [f"generation_kwargs[{key!r}]={given[key]!r}" for key in DECODING_KWARGS if key in given]
        raise ValueError(
            f"{', '.join(decoding) or 'generation_kwargs'} makes transformers' generate decode by {mode.value}, "
            "but rollout_sampling_seed='per_step' samples every token with its own generator, one sample at a time. "
            "Remove it from generation_kwargs, or set rollout_sampling_seed='global' (which also rules out "
            "overlap_rollout)."
        )


@dataclass(frozen=True)
class CallState:
    """The trainer state an engine call sees: the optimizer step it generates at, which no update moves."""

    global_step: int


def engine_view(trainer: GRPOTrainer, seed: int, global_step: int, model: torch.nn.Module | None) -> GRPOTrainer:
    """What one engine call runs on: an instance of the trainer's class holding only what TRL's engine call reads
    (`ENGINE_CALL_ATTRIBUTES`), with its own state at `global_step`, its own sampling settings carrying `seed`, and
    for transformers' generate `model`, the model to generate with (unused with vLLM). Its `_last_loaded_step` is its
    step, so TRL's call never sends the engine weights: `trl_bapo.vllm_sync.EngineWeights` has sent them."""
    # Of the trainer's class, for TRL's method and its `super()` call, but not initialised: an attribute the call
    # reads and is not given fails loudly instead of reading the live trainer.
    view = object.__new__(type(trainer))
    view.__dict__.update({name: getattr(trainer, name) for name in ENGINE_CALL_ATTRIBUTES})
    view.state, view._last_loaded_step = CallState(global_step), global_step
    if trainer.use_vllm:
        # The engine's handle with its own sampling settings; the server and its client are the trainer's.
        view.vllm_generation = copy.copy(trainer.vllm_generation)
        view.vllm_generation.generation_kwargs = {**trainer.vllm_generation.generation_kwargs, "seed": seed}
        return view
    view.model_wrapped = model
    # What transformers' sampling would apply: TRL's settings, and the model's own where TRL leaves them unset.
    effective = {**trainer.generation_kwargs, **model_sampling(trainer)}
    sampling = {key: effective.get(key) for key in ("temperature", "top_k", "top_p", "min_p")}
    greedy = {**trainer.generation_kwargs, "do_sample": False, **dict.fromkeys(sampling)}
    view.generation_kwargs = greedy
    view.generation_config = GenerationConfig(**greedy, disable_compile=True)
    view._step_sampler = StepSampler(torch.Generator().manual_seed(seed), warpers(sampling))
    return view


@contextmanager
def sampling_with_own_generator(view: GRPOTrainer) -> Iterator[None]:
    """Around an engine call on an `engine_view`: transformers' `generate` takes the step's sampler, and the model
    generates with dropout off."""
    if view.use_vllm:
        yield
        return
    model = view.accelerator.unwrap_model(view.model_wrapped)
    was_training = model.training
    generate = type(model).generate

    def with_sampler(*args, **kwargs):
        return generate(model, *args, logits_processor=LogitsProcessorList([view._step_sampler]), **kwargs)

    model.generate = with_sampler
    model.eval()
    try:
        yield
    finally:
        del model.generate
        model.train(was_training)


def engine_call(
    view: GRPOTrainer, prompt_ids, images, multimodal_fields, num_generations: int, has_tool_images: bool = False
) -> tuple:
    """TRL's engine call (trl 1.16.0, `GRPOTrainer._generate_single_turn`) on an `engine_view`: completion ids and
    the engine's log-probs."""
    with sampling_with_own_generator(view):
        return GRPOTrainer._generate_single_turn(
            view, prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
