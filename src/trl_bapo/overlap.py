"""Overlapped rollout (`overlap_rollout`): the engine call of rollout step t+1 runs in the background while step t
trains, and the run equals the synchronous one bit for bit.

Inside a delay window alpha is frozen, so step t+1's rollout does not depend on step t's update; with per-step sampling
seeds (`trl_bapo.sampling`) it does not depend on when it runs either. Only the engine call moves: the prompts are read
ahead from the train dataloader's own iterator (the batches transformers will hand to the next steps, kept for them),
tokenized on the main thread, and generated on a replica of alpha (transformers' generate) or by the vLLM server.
Everything that depends on the update (rewards, scoring, log-probs, re-evaluation, the buffers, metrics) stays on the
main thread, in the synchronous order: step t+1 takes the prefetched completions in place of its own engine call.
With a PEFT model the server generates with alpha's adapter, which it already holds (`trl_bapo.lora_sync`): the
background call only names it.

The background call gets what it needs as explicit inputs (`trl_bapo.sampling.engine_view`): its own frozen state at
the step the synchronous run would generate at, its seed and sampling settings, and the replica; it holds nothing
that training changes, and never sends the engine weights (alpha is sent before it starts).

No prefetch where step t+1 could differ or the engine is needed in between: a refresh step, the last step, the end of
an epoch (no batch left to read), an evaluation before the next rollout, prompts with images.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from types import MethodType
from typing import Any

import torch
from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

from trl_bapo.sampling import SamplingSeeds, check_step_sampling, engine_call, engine_view


class ReadAhead:
    """The train dataloader's iterator of this epoch, as transformers reads it (`get_batch_samples`), with the batches
    it has not asked for yet that a prefetch read early, kept for it in order. Of those given out it keeps only what a
    prefetch can still ask about: the current rollout step's first batch on (`keep_from`)."""

    def __init__(self):
        self._source: Iterator | None = None
        self._read: list[Any] = []  # every batch read from the source this epoch, in order
        self._given = 0  # how many of them transformers has taken

    def wrap(self, source: Iterator) -> Iterator:
        if source is not self._source:  # a new epoch (or a resumed one)
            self._source, self._read, self._given = source, [], 0
        return self

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        if self._given == len(self._read):
            self._read.append(next(self._source))
        self._given += 1
        return self._read[self._given - 1]

    @property
    def kept(self) -> int:
        """How many batches it holds."""
        return len(self._read)

    def keep_from(self, batch: Any) -> None:
        """Forgets the batches given out before `batch`, the current rollout step's, which no prefetch asks about
        again; all those given out if `batch` is not this epoch's."""
        position = self._position(batch)
        forgotten = self._given if position is None else position
        del self._read[:forgotten]
        self._given -= forgotten

    def after(self, batch: Any, distance: int) -> Any | None:
        """The batch `distance` batches after `batch` (one transformers has given out), read early; None when the
        epoch ends first or `batch` is not this epoch's."""
        position = self._position(batch)
        if position is None:
            return None
        try:
            while len(self._read) <= position + distance:
                self._read.append(next(self._source))
        except StopIteration:
            return None
        return self._read[position + distance]

    def _position(self, batch: Any) -> int | None:
        return next((i for i in range(self._given - 1, -1, -1) if self._read[i] is batch), None)


class EngineCalls:
    """The trainer's engine calls: TRL's own with the global seed, else each with its per-step seed, taken from the
    background call (at most one, for the next rollout step) where it was prefetched; and the time spent on them."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.seeds = SamplingSeeds(trainer.args.seed, trainer.accelerator.process_index)
        self.read_ahead = ReadAhead()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[tuple, Future] | None = None
        self._replica: torch.nn.Module | None = None
        self._replica_step: int | None = None
        self._draw: Iterator[int] | None = None  # the seeds of a `same_draw` under way
        self.seconds = self.wait_seconds = 0.0  # this rollout step's engine calls: their time, and the time waited
        self.prefetched = False

    def generate(self, trl_call, prompt_ids, images, multimodal_fields, num_generations: int, has_tool_images=False):
        """One engine call (completion ids and the engine's log-probs); `trl_call` is TRL's. Training's are timed."""
        trainer = self.trainer
        if trainer.args.rollout_sampling_seed == "global":
            call = trl_call
        else:
            if self._draw is not None:
                seed = next(self._draw)
            else:
                seed = self.seeds.next(trainer._bapo.rollout_step, trainer.state.global_step)
                prefetched = self.take(seed, prompt_ids)
                if prefetched is not None:
                    return prefetched
            view = engine_view(trainer, seed, trainer.state.global_step, trainer.model_wrapped)
            inputs = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
            call = partial(engine_call, view, *inputs)
        return self.timed(call) if trainer.model.training and self._draw is None else call()

    @contextmanager
    def same_draw(self, name: str) -> Iterator[None]:
        """Engine calls inside draw the same samples whenever the block runs with the same weights, and move nothing
        training draws from: with the global seed, from the global generator seeded with `seed`; with per-step seeds,
        from the seeds of the draw `name` (`SamplingSeeds.draw`), whatever the steps. They are not training's, so not
        timed, and they leave a prefetch alone."""
        device = self.trainer.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.trainer.args.seed)
            self._draw = self.seeds.draw(name)
            try:
                yield
            finally:
                self._draw = None

    def start(self, generation_batch: list[dict[str, Any]], t: int) -> None:
        """After rollout step t's batch is assembled: starts step t+1's engine call if nothing can change it."""
        trainer, args = self.trainer, self.trainer.args
        self.read_ahead.keep_from(generation_batch)
        micro_steps = args.steps_per_generation * trainer.num_iterations  # from one rollout step to the next
        updates = micro_steps // args.gradient_accumulation_steps
        steps_ahead = range(trainer.state.global_step + 1, trainer.state.global_step + updates + 1)
        evaluates = args.eval_strategy == "steps" and any(step % trainer.state.eval_steps == 0 for step in steps_ahead)
        if (
            trainer._bapo.snapshot.will_refresh(t + 1)
            or trainer.state.global_step + updates >= trainer.state.max_steps
            or evaluates
        ):
            return
        batch = self.read_ahead.after(generation_batch, micro_steps)
        if batch is None or any("image" in example or "images" in example for example in batch):
            return
        prompt_ids, images, multimodal_fields = trainer._tokenize_prompts([example["prompt"] for example in batch])
        # The step the synchronous run generates at: its seed, and the state the call sees.
        step = trainer.state.global_step + updates
        seed = self.seeds.first(t + 1, step)
        # The engine gets alpha first: on a server that loads adapters, the view copies the name of the one it names.
        trainer._engine.alpha(trainer.accelerator.unwrap_model(trainer.model), t + 1, refreshed=False)
        view = engine_view(trainer, seed, step, None if trainer.use_vllm else self._alpha_replica())
        self._executor = self._executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="bapo-prefetch")
        call = (view, prompt_ids, images, multimodal_fields, trainer.num_generations, torch.get_num_threads())
        self._pending = ((seed, prompt_ids), self._executor.submit(_timed_call, *call))

    def take(self, seed: int, prompt_ids: list[list[int]]) -> tuple | None:
        """The prefetched result of the engine call with this seed and these prompts, waited for; None if there is
        none (and any other prefetch is dropped). A failed background call raises its error here."""
        if self._pending is None:
            return None
        (key, future), self._pending = self._pending, None
        if key != (seed, prompt_ids):  # not the call it was made for: dropped, as if never made
            future.exception()
            return None
        started = time.perf_counter()
        result, seconds = future.result()
        self.wait_seconds += time.perf_counter() - started
        self.seconds += seconds
        self.prefetched = True
        return result

    def timed(self, call) -> tuple:
        """A synchronous engine call, timed: all of it is waited for."""
        started = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - started
        self.seconds, self.wait_seconds = self.seconds + elapsed, self.wait_seconds + elapsed
        return result

    def metrics(self) -> dict[str, float]:
        """This rollout step's generation time, the part the trainer waited for, and whether it was prefetched;
        then starts counting the next step's."""
        values = {
            "generation_seconds": self.seconds,
            "generation_wait_seconds": self.wait_seconds,
            "prefetched": float(self.prefetched),
        }
        self.seconds = self.wait_seconds = 0.0
        self.prefetched = False
        return values

    def close(self) -> None:
        """Waits for a background call still running (its result is dropped) and ends the thread."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].exception()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @torch.no_grad()
    def _alpha_replica(self) -> torch.nn.Module:
        """A copy of the policy holding alpha, for transformers' generate to run on while the policy trains; its
        weights are copied from the rollout snapshot again when alpha is refreshed."""
        snapshot = self.trainer._bapo.snapshot
        if self._replica is None:
            trainer = self.trainer
            self._replica = independent_copy(trainer.accelerator.unwrap_model(trainer.model), trainer.accelerator)
        if self._replica_step != snapshot.step:
            parameters = dict(self._replica.named_parameters())
            for name, weights in snapshot.weights.items():
                parameters[name].copy_(weights)
            self._replica_step = snapshot.step
        return self._replica


def independent_copy(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """A deep copy of `model` that computes with its own weights only. The model's `forward` is patched twice, by
    closures a copy would share with the original: TRL's fused LM head (trl 1.16.0, `add_fused_lm_head`), which runs
    the original's forward when generating, and, under mixed precision, accelerate's autocast around it (accelerate
    1.15, `Accelerator.prepare_model`). The copy gets its class's forward with the same autocast around it."""
    check_forwards(model)  # refused at construction already; a patch since then is refused here
    replica = copy.deepcopy(model)
    replica.requires_grad_(False)
    for name in ("forward", "_original_forward"):
        replica.__dict__.pop(name, None)
    if "_original_forward" in model.__dict__:
        autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
        replica.forward = MethodType(convert_outputs_to_fp32(autocast(type(model).forward)), replica)
    return replica


def check_forwards(model: torch.nn.Module) -> None:
    """Refuses a model with a submodule whose `forward` is patched on the instance: a closure over the original, which
    a copy (the replica of alpha) would run. The model's own forward is `independent_copy`'s to replace."""
    patched = [name for name, module in model.named_modules() if name and "forward" in module.__dict__]
    if patched:
        raise ValueError(
            f"overlap_rollout copies the policy to generate with alpha, but the forward of {', '.join(patched)} is "
            "patched by a closure over the original, which the copy would run. Set overlap_rollout=False."
        )


def check_overlap(trainer) -> None:
    """Refuses `overlap_rollout` where the background call could not equal the synchronous one, and per-step seeds
    where the engine call is not TRL's or would drop a sampling setting (`trl_bapo.sampling.check_step_sampling`)."""
    from accelerate.utils import DistributedType, is_peft_model

    if trainer.rollout_func is not None and trainer.args.rollout_sampling_seed == "per_step":
        raise ValueError(
            "rollout_sampling_seed='per_step' seeds TRL's engine call, which a rollout_func replaces; seed inside the "
            "rollout_func, or set rollout_sampling_seed='global'."
        )
    check_step_sampling(trainer)
    if not trainer.args.overlap_rollout:
        return
    # With vLLM nothing is copied: the server holds alpha (its adapter, or the merged weights TRL's sync sent).
    peft_generate = is_peft_model(trainer.model) and not trainer.use_vllm
    reasons = {
        "a PEFT model on transformers' generate (the replica of alpha is built for full models)": peft_generate,
        "FSDP or ZeRO-3 (generation is a collective over every process's shards)": trainer._sharded,
        # TRL's server call gathers the prompts and broadcasts the completions over the process group, collectives
        # the training step also runs (its gradients' all-reduce); torchrun makes one even for a single process.
        "the vLLM server in a process group (several processes, or one under torchrun or a DDP, DeepSpeed or FSDP "
        "launch: its call gathers the prompts over the group; start a single process with `python` or `accelerate "
        "launch --num_processes 1` instead)": trainer.use_vllm
        and trainer.accelerator.distributed_type != DistributedType.NO,
        "tools or environments (each batch's environment state is set when it is scored)": bool(trainer.tools)
        or trainer.environment_factories is not None,
        "a rollout_func": trainer.rollout_func is not None,
        "cast_lm_head_to_fp32 (its patched head computes with the live policy's)": trainer.args.cast_lm_head_to_fp32,
    }
    refused = [reason for reason, applies in reasons.items() if applies]
    if refused:
        raise ValueError(f"overlap_rollout=True does not run with {'; '.join(refused)}. Set overlap_rollout=False.")
    if not trainer.use_vllm:  # transformers' generate runs on a replica of alpha
        check_forwards(trainer.accelerator.unwrap_model(trainer.model))


def _timed_call(view, prompt_ids, images, multimodal_fields, num_generations: int, threads: int) -> tuple:
    # The trainer's thread count: kernels may split their sums by it, and the rollout must equal the synchronous one.
    torch.set_num_threads(threads)
    started = time.perf_counter()
    result = engine_call(view, prompt_ids, images, multimodal_fields, num_generations)
    return result, time.perf_counter() - started
