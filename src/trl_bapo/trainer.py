"""`BAPOTrainer`: TRL's GRPOTrainer with Batch Adaptation Policy Optimization (Algorithm 1, appendix A.8).

Overrides, each checked against trl 1.16.0 and transformers 5.23:
- `_prepare_inputs`: on generation steps, builds the training batch X1 + X2 + X3 instead of using the fresh
  rollout as is, and cuts it with BAPO's own rule (TRL's `split_tensor_dict` drops rows that do not divide).
- `_calculate_rewards`: calls TRL's and keeps the gathered rewards per function, which say which completions are
  correct (TRL's advantages say which groups carry a learning signal).
- `compute_loss`: scales TRL's loss by the micro-batch's share of the assembled batch.
- `_save_optimizer_and_scheduler` / `_load_optimizer_and_scheduler`: write and read BAPO's state (buffers,
  counters, thresholds' running reward, rollout snapshot, random generator) beside the optimizer's in every
  checkpoint. transformers calls both on every process, and saves before it pushes a checkpoint to the Hub.
- `__init__`: with `kl_reference="behavior"`, stops TRL from building a frozen reference model that the
  behavior-policy KL never reads.

Everything else, generation, reward scoring, advantages and the clipped surrogate, is TRL's. The behavior
log-probs of every sample travel in TRL's `old_per_token_logps`, which TRL's loss already divides by. With vLLM,
BAPO decides when TRL's own weight sync runs (`_sync_engine`), so the engine holds alpha at every rollout. Image
fields are split per row and merged back with TRL's `split_pixel_values_by_grid` / `unsplit_pixel_values_by_grid`.
Under FSDP2 and DeepSpeed the rollout snapshot holds each process's own shards (`trl_bapo.engines`), and every
forward BAPO adds runs on every process the same number of times, since a sharded forward is a collective.
"""

from __future__ import annotations

import copy
import math
import os
import textwrap
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import broadcast, gather_object, send_to_device
from transformers import TrainerCallback
from transformers.utils import logging
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import (
    get_callable_name,
    get_config_model_id,
    split_pixel_values_by_grid,
    unsplit_pixel_values_by_grid,
)

from trl_bapo.batch import (
    concat_batches,
    gather_batch,
    loss_mask,
    masked_row,
    num_rows,
    select_rows,
    split_micro_batches,
    unmeasured_rows,
)
from trl_bapo.buffers import BAPOStatus, DifficultBuffer, HighQualityBuffer, ReplayGroup
from trl_bapo.checkpoint import (
    STATE_VERSION,
    UNREADABLE,
    read_state,
    resume_advice,
    state_file,
    unreadable_reason,
    write_state,
)
from trl_bapo.config import BAPOConfig
from trl_bapo.correction import combine_stats, source_weight_stats, weight_metrics, weighted_advantages
from trl_bapo.engines import local_shard, trainable_parameters
from trl_bapo.losses import OFF_POLICY_LOSSES, adaptive_clip_bounds, asymre_loss, opmd_loss, rec_loss
from trl_bapo.rollout import RolloutSnapshot
from trl_bapo.selection import (
    adaptive_threshold,
    beats_mask,
    correct_completions,
    difficult_mask,
    group_accuracy,
    group_has_variance,
    group_rows,
    high_quality_mask,
    improved_mask,
    online_filter_mask,
    x3_room,
)
from trl_bapo.vllm_sync import send_weights

BEHAVIOR_LOGPS = "old_per_token_logps"
# Per row: 1, 2 or 3 for a row of X1, X2 or X3.
SOURCE = "bapo_source"
# Per token, with off_policy_correction="decoupled": min(pi_start / pi_behavior, importance_sampling_cap).
IMPORTANCE_WEIGHT = "bapo_importance_weight"
# Image fields TRL's forward takes besides the token ids (trl 1.16.0, GRPOTrainer._compute_loss).
MULTIMODAL_FIELDS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)

logger = logging.get_logger(__name__)


@dataclass
class ScoredRollout:
    """One call of TRL's generation and scoring: this process's rows, and for every process's completions the
    advantages TRL gave them, whether each is correct, and the dataset rows they answer."""

    rows: dict[str, Any]
    advantages: torch.Tensor
    correct: torch.Tensor
    examples: list[dict[str, Any]]


@dataclass
class FreshRollout:
    """X_on of one rollout step, gathered from every process, with what Algorithm 1 decides for each group."""

    rows: dict[str, Any]
    examples: list[dict[str, Any]]  # the dataset row of each completion
    accuracy: torch.Tensor  # mu per group
    x1: torch.Tensor  # kept by the online filter (line 11)
    high: torch.Tensor  # stored in B_high (line 9)
    c2: float  # the thresholds of eq. 8 at this step
    c3: float
    lag: int  # steps since alpha was taken


@dataclass
class Replay:
    """X2 or X3 of one rollout step: its rows (in parts), its number of groups, and for X2 the number of B_bad's
    prompts re-evaluated to find them."""

    parts: list[dict[str, Any]]
    groups: int
    reevaluated: int = 0


def reward_names(reward_funcs) -> list[str]:
    """The names TRL gives `reward_funcs` (trl 1.16.0, GRPOTrainer.__init__), before any reward model is loaded: a
    model's id (the last part of its path), or the function's name."""
    funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs] if reward_funcs is not None else []
    return [
        func.rstrip("/").split("/")[-1]
        if isinstance(func, str)
        else get_config_model_id(func.config).split("/")[-1]
        if isinstance(func, torch.nn.Module)
        else get_callable_name(func)
        for func in funcs
    ]


class BAPOTrainer(GRPOTrainer):
    """Drop-in for `trl.GRPOTrainer` that trains on BAPO's adaptive batch. Takes the same arguments; `args`
    must be a [`BAPOConfig`]."""

    _tag_names = ["trl", "grpo", "bapo", "off-policy"]
    _name = "BAPO"
    # What TRL's model card cites as the trainer's source (trl 1.16.0, BaseTrainer.create_model_card).
    _paper = {
        "title": "Buffer Matters: Unleashing the Power of Off-Policy Reinforcement Learning in Large Language Model "
        "Reasoning",
        "id": "2602.20722",
        "citation": textwrap.dedent("""\
            @article{wan2026buffer,
                title        = {{Buffer Matters: Unleashing the Power of Off-Policy Reinforcement Learning in Large
                                 Language Model Reasoning}},
                author       = {Xu Wan and Yansheng Wang and Wenqi Huang and Mingyang Sun},
                year         = 2026,
                eprint       = {arXiv:2602.20722},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: BAPOConfig | None = None, *more, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = BAPOConfig(f"{model_name.split('/')[-1]}-BAPO")
        if not isinstance(args, BAPOConfig):
            raise TypeError(
                f"BAPOTrainer needs a BAPOConfig, got {type(args).__name__}; build the config with "
                "trl_bapo.BAPOConfig(...), which accepts every GRPOConfig field."
            )
        names = reward_names(reward_funcs)
        if args.correctness_reward is not None and args.correctness_reward not in names:
            # Checked before TRL loads the model, the reward models and the engine.
            raise ValueError(
                f"correctness_reward={args.correctness_reward!r} names none of this trainer's reward functions "
                f"{names}; set it to one of them (as in TRL's `rewards/<name>/mean` log)."
            )
        self._behavior_kl = args.kl_reference == "behavior" and args.beta != 0.0
        beta = args.beta
        if self._behavior_kl:
            args.beta = 0.0
        try:
            super().__init__(model, reward_funcs, args, *more, **kwargs)
        finally:
            args.beta = beta
        self.beta = beta
        if self._dist.fsdp_version == 1 and args.rollout_delay > 1:
            raise NotImplementedError(
                "The delayed rollout policy swaps each process's parameter shards, which FSDP1's flattened "
                "parameters do not expose. Use FSDP2 (fsdp_version: 2 in the accelerate config) or rollout_delay=1."
            )
        # Under FSDP and ZeRO-3 every forward is a collective that all processes must enter together.
        self._collective_forwards = self.accelerator.num_processes > 1 and (self._dist.is_fsdp or self._dist.is_zero3)
        self._correctness_column = None
        if args.correctness_reward is not None:
            self._correctness_column = self.reward_func_names.index(args.correctness_reward)
        self._warned_reward_range = False
        if args.dynamic_sampling and not hasattr(self.train_dataset, "__getitem__"):
            raise ValueError(
                "dynamic_sampling draws extra prompts by index and needs a map-style train dataset; pass a "
                "datasets.Dataset rather than an IterableDataset, or set dynamic_sampling=False."
            )

        self._batch_groups = args.generation_batch_size // self.num_generations  # B, prompts per rollout batch
        self._rollout_step = 0  # t in Algorithm 1
        self._snapshot = RolloutSnapshot(args.rollout_delay)
        self._difficult = DifficultBuffer(args.difficult_buffer_size or self._batch_groups)
        self._high_quality = HighQualityBuffer(args.high_quality_buffer_steps)
        # Own generator: BAPO's random choices must not shift the global RNG that generation draws from.
        self._generator = torch.Generator().manual_seed(args.seed)
        self._reward_sum = 0.0
        self._reward_count = 0
        self._rollouts = 0
        self._prompt_order: list[int] = []  # dynamic sampling's own pass over the train dataset
        self._skip_update = False
        self._frozen_step = FrozenStep()
        self.add_callback(self._frozen_step)
        self._last_rewards_per_func: torch.Tensor | None = None
        self._scoring_seconds = 0.0  # time spent in TRL's generation and scoring during this rollout step
        self._weight_stats: list[torch.Tensor] = []  # the decoupled correction's, per micro-batch of this step
        self._engine_holds_alpha = False  # a (re)started vLLM engine holds the base model

    @property
    def bapo_status(self) -> BAPOStatus:
        """A read-only copy of BAPO's buffers, thresholds and counters as they stand after the last rollout step."""
        return BAPOStatus.of(
            self._difficult,
            self._high_quality,
            rollout_step=self._rollout_step,
            rollout_policy_step=self._snapshot.step,
            c1=self.args.c1,
            c2=adaptive_threshold(self._r_tot, self.args.c2_range),
            c3=adaptive_threshold(self._r_tot, self.args.c3_range),
            r_tot=self._r_tot,
            rollouts=self._rollouts,
        )

    # ---- TRL overrides -------------------------------------------------------------------------------------

    def _prepare_inputs(self, generation_batch: dict[str, torch.Tensor | Any]) -> dict[str, torch.Tensor | Any]:
        if not self.model.training:
            return self._evaluation_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            started, self._scoring_seconds = time.perf_counter(), 0.0
            batch, filler = self._assemble_batch(generation_batch)
            self._skip_update = num_rows(batch) == 0
            # Every process holds the whole batch and takes its own share of micro-batches, so all of them run
            # the same number of forward/backward passes whatever the batch size.
            steps, rank = self.args.steps_per_generation, self.accelerator.process_index
            chunks = split_micro_batches(
                select_rows(batch, self._shared_permutation(num_rows(batch))),
                steps * self.accelerator.num_processes,
                self.loss_type,
                filler,
                self._tokenizer.pad_token_id,
                equal_sizes=self.accelerator.num_processes > 1,
            )
            self._weight_stats = []
            self._buffered_inputs = [
                unsplit_pixel_values_by_grid(self._finish_behavior_logps(chunk))
                for chunk in chunks[rank * steps : (rank + 1) * steps]
            ]
            if self._weight_stats:  # decoupled correction: the same number of micro-batches on every process
                stats = combine_stats(self._weight_stats)
                if self.accelerator.num_processes > 1:
                    stats = combine_stats(list(self.accelerator.gather(stats.to(self.accelerator.device)[None]).cpu()))
                self._log_step(**weight_metrics(stats))
            # BAPO's own work on this rollout step: assembly and the behavior log-prob forwards it adds.
            self._log_step(assembly_seconds=time.perf_counter() - started - self._scoring_seconds)
        if self._skip_update:
            self._frozen_step.hold(self.optimizer)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        write_state(state_file(output_dir, self.accelerator.process_index), self._bapo_state())

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_bapo_state(checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            with self._reference_kl_off():
                return self._loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self._loss(model, inputs, return_outputs, num_items_in_batch)
        return loss * inputs["bapo_loss_scale"] if "bapo_loss_scale" in inputs else loss

    def _loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss, with adaptive clipping bounds when asked; or one of `trl_bapo.losses`' own."""
        if self.loss_type in OFF_POLICY_LOSSES:
            return self._off_policy_loss(model, inputs)
        if IMPORTANCE_WEIGHT in inputs:
            inputs = weighted_advantages(inputs, inputs[IMPORTANCE_WEIGHT])
        if self.args.adaptive_clipping and model.training:
            with self._adaptive_clipping(inputs):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _off_policy_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """REC, AsymRE or OPMD on a micro-batch: the mean per-token loss over its tokens (as TRL's 'bnpo'),
        weighed by TRL's vLLM importance sampling ratio when present, plus TRL's KL term and entropy bonus."""
        args, mode = self.args, "train" if model.training else "eval"
        mask = loss_mask(inputs)
        logps, entropies, aux_loss = self._forward_logps(model, inputs, with_grad=True)
        old = inputs.get(BEHAVIOR_LOGPS, logps.detach())
        advantages = inputs["advantages"].unsqueeze(1)
        if self.loss_type == "rec":
            per_token = rec_loss(
                logps,
                old,
                advantages,
                args.rec_variant,
                self.epsilon_low,
                self.epsilon_high,
                args.rec_ring_epsilon_low,
                args.rec_ring_epsilon_high,
            )
        elif self.loss_type == "asymre":
            per_token = asymre_loss(logps, advantages, args.asymre_tau)
        else:
            per_token = opmd_loss(logps, old, advantages, args.opmd_tau)
        for weight in ("importance_sampling_ratio", IMPORTANCE_WEIGHT):  # TRL's vLLM weight, the decoupled one
            if weight in inputs:
                per_token = per_token * inputs[weight]
        if self.beta != 0.0:  # TRL's k3 estimate of KL(pi || ref)
            log_ratio = inputs["ref_per_token_logps"] - logps
            kl = torch.exp(log_ratio) - log_ratio - 1
            if args.use_bias_correction_kl:  # weighed by the ratio to the behavior policy, as TRL does
                kl = kl * torch.exp(logps - old)
            per_token = per_token + self.beta * kl
            self._metrics[mode]["kl"].append(self._gathered_mean(kl, mask))
        tokens = mask.sum().clamp(min=1.0)
        loss = (per_token * mask).sum() / tokens
        entropy = (entropies * mask).sum() / tokens
        loss = loss - self.entropy_coef * entropy
        self._metrics[mode]["entropy"].append(self._gathered_mean(entropies, mask))
        if self.aux_loss_enabled:  # the MoE load-balancing loss, as TRL adds it
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)

    @contextmanager
    def _adaptive_clipping(self, inputs: dict[str, Any]) -> Iterator[None]:
        """Runs TRL's loss with bounds chosen for this micro-batch. TRL's loss takes the current log-probs from
        one forward pass and then reads `epsilon_low` / `epsilon_high`: the bounds are chosen right after that
        forward, from its ratios, and the dual clip goes through TRL's `delta`."""
        name, args = "_get_per_token_logps_and_entropies", self.args
        forward, bounds = getattr(self, name), (self.epsilon_low, self.epsilon_high)
        shadowed = self.__dict__.get(name)  # a wrapper someone set on this instance, restored afterwards

        def forward_then_choose(*a, **k):
            logps, entropies, aux = forward(*a, **k)
            old = inputs.get(BEHAVIOR_LOGPS, logps.detach())
            chosen = adaptive_clip_bounds(
                torch.exp(logps.detach() - old),
                weighted_advantages(inputs, 1.0)["advantages"],  # per row, or per token when weighted
                loss_mask(inputs),
                start=tuple(args.adaptive_clip_start),
                step=args.adaptive_clip_step,
                maximum=tuple(args.adaptive_clip_max),
                target=args.adaptive_clip_target,
                all_reduce=self._sum_processes,
            )
            self.epsilon_low, self.epsilon_high = 1 - chosen.low, chosen.high - 1
            self._log_step(clip_low=chosen.low, clip_high=chosen.high)
            self._log_step(clip_positive=chosen.positive, clip_negative=chosen.negative)
            return logps, entropies, aux

        setattr(self, name, forward_then_choose)
        args.delta = args.adaptive_clip_dual
        try:
            yield
        finally:
            if shadowed is None:
                delattr(self, name)
            else:
                setattr(self, name, shadowed)
            (self.epsilon_low, self.epsilon_high), args.delta = bounds, None

    def _evaluation_inputs(self, generation_batch: dict[str, torch.Tensor | Any]) -> dict[str, torch.Tensor | Any]:
        """TRL's evaluation, generating with the current policy. With the behavior-policy KL, the policy that
        generates the evaluation samples is the one evaluated, so the KL term is zero and no reference model is
        read (TRL would look for one, or measure against the base model under PEFT)."""
        if self.use_vllm and self._last_loaded_step != self.state.global_step:
            # The evaluation generates with the current weights, sent through BAPO's sync (TRL's would fail where
            # vLLM's CPU build repacked the weights); the engine no longer holds alpha.
            send_weights(self.vllm_generation)
            self._last_loaded_step = self.state.global_step
            self._engine_holds_alpha = False
        with self._reference_kl_off():
            return super()._prepare_inputs(generation_batch)

    # ---- Algorithm 1, one rollout step ---------------------------------------------------------------------

    def _assemble_batch(self, inputs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Runs rollout step t (lines 2-17 of Algorithm 1) and returns the training batch X1 + X2 + X3 and a
        loss-free filler row (which keeps the batch's fields, so it can share a micro-batch with real rows).

        Decisions are taken on the rollout gathered from every process, so they are the same everywhere.
        """
        self._rollout_step += 1
        t = self._rollout_step
        fresh = self._fresh_rollout(inputs, t)
        x1 = select_rows(fresh.rows, group_rows(fresh.x1.nonzero().flatten(), self.num_generations))
        num_x1 = int(fresh.x1.sum())
        x2 = self._difficult_replay(t, room=x3_room(self._batch_groups, num_x1, 0))
        x3 = self._high_quality_replay(t, fresh, room=x3_room(self._batch_groups, num_x1, x2.groups))
        parts = [x1, *x2.parts, *x3.parts]
        sources = [1] + [2] * len(x2.parts) + [3] * len(x3.parts)
        for part, source in zip(parts, sources):  # which of X1, X2, X3 each row is, for the metrics by source
            part[SOURCE] = torch.full((num_rows(part),), source, device=part["completion_ids"].device)
        batch = concat_batches(parts, self._tokenizer.pad_token_id)  # line 17
        batch["num_items_in_batch"] = loss_mask(batch).sum()
        self._log_step(
            x1=num_x1,
            x2=x2.groups,
            x3=x3.groups,
            batch_fill=(num_x1 + x2.groups + x3.groups) / self._batch_groups,
            difficult_buffer=len(self._difficult),
            high_quality_buffer=len(self._high_quality),
            c2=fresh.c2,
            c3=fresh.c3,
            r_tot=self._r_tot,
            rollouts=self._rollouts,
            reevaluated=x2.reevaluated,
            policy_lag=fresh.lag,
            skipped=float(num_rows(batch) == 0),
        )
        return batch, masked_row(batch if num_rows(batch) else fresh.rows)

    def _fresh_rollout(self, inputs: list[dict[str, Any]], t: int) -> FreshRollout:
        """Lines 3-9 and 11: refresh alpha when t mod v = 0, generate and score X_on with alpha, store its
        difficult prompts in B_bad, and decide which groups the online filter keeps (X1) and which B_high keeps."""
        args, group_size = self.args, self.num_generations
        policy = self.accelerator.unwrap_model(self.model)
        refreshed = self._snapshot.maybe_refresh(policy, t)
        if self.use_vllm:
            self._sync_engine(policy, t, refreshed)
        lag = self._snapshot.lag(t)
        with self._snapshot.applied(policy, t):
            rounds = self._sample_fresh(inputs)
            correct = torch.cat([scored.correct for scored in rounds])
            accuracy = group_accuracy(correct, group_size)
            self._reward_sum += float(torch.nansum(correct))
            self._reward_count += int((~torch.isnan(correct)).sum())
            c2 = adaptive_threshold(self._r_tot, args.c2_range)
            c3 = adaptive_threshold(self._r_tot, args.c3_range)
            x1 = online_filter_mask(
                accuracy,
                group_has_variance(torch.cat([scored.advantages for scored in rounds]), group_size),
                "range" if args.mini_test else args.online_filter,
                group_size,
                self._generator,
                args.online_filter_gaussian_mean,
                args.online_filter_gaussian_std,
                args.online_filter_uniform_keep,
            )
            if args.dynamic_sampling:
                x1 &= x1.cumsum(0) <= self._batch_groups  # DAPO trains on exactly B groups when it has them
            high = high_quality_mask(accuracy, c2, c3) & args.use_high_quality_replay
            # Behavior log-probs are taken now, while alpha is in the model: for X1 when it is off-policy or
            # the KL needs them, and for every group kept for later replay.
            rows = self._gather_rounds(rounds, high | (x1 & (lag > 0 or self._behavior_kl)))
        examples = [example for scored in rounds for example in scored.examples]
        self._rollouts += len(examples)
        if args.use_difficult_replay:  # line 8
            bad = difficult_mask(accuracy, args.c1).nonzero().flatten().tolist()
            self._difficult.add([examples[g * group_size] for g in bad], [float(accuracy[g]) for g in bad])
        return FreshRollout(rows, examples, accuracy, x1, high, c2, c3, lag)

    def _high_quality_replay(self, t: int, fresh: FreshRollout, room: int) -> Replay:
        """Line 16, then line 9: X3 drawn from B_high's groups of earlier steps with c2 <= mu <= c3, at most
        `room` of them; then this step's high-quality groups join B_high, for the steps to come."""
        group_size, device = self.num_generations, fresh.rows["completion_ids"].device
        self._high_quality.expire(t)
        replayed = self._high_quality.sample(t, fresh.c2, fresh.c3, room, self._generator)
        self._high_quality.add(
            [
                ReplayGroup(
                    step=t,
                    accuracy=float(fresh.accuracy[g]),
                    rows=send_to_device(select_rows(fresh.rows, group_rows(torch.tensor([g]), group_size)), "cpu"),
                    prompt=fresh.examples[g * group_size]["prompt"],
                )
                for g in fresh.high.nonzero().flatten().tolist()
            ]
        )
        return Replay([send_to_device(group.rows, device) for group in replayed], len(replayed))

    def _sync_engine(self, policy: torch.nn.Module, t: int, refreshed: bool) -> None:
        """vLLM generates with alpha: it gets the weights on refresh steps (line 5 of Algorithm 1), and alpha again
        wherever it lost it, at the first step of a (re)started engine and after an evaluation. TRL would sync
        whenever the optimizer has stepped; BAPO tells it the engine is up to date."""
        if refreshed or not self._engine_holds_alpha:
            with self._snapshot.applied(policy, t):
                send_weights(self.vllm_generation)
            self._engine_holds_alpha = True
        self._last_loaded_step = self.state.global_step

    def _sample_fresh(self, inputs: list[dict[str, Any]]) -> list[ScoredRollout]:
        """X_on: one rollout batch, or with `dynamic_sampling` as many as DAPO draws (at most
        `dynamic_sampling_max_rounds`) until B groups have non-zero reward variance."""
        rounds = [self._score(inputs)]
        if not self.args.dynamic_sampling:
            return rounds
        while len(rounds) < self.args.dynamic_sampling_max_rounds and (
            sum(int(group_has_variance(s.advantages, self.num_generations).sum()) for s in rounds) < self._batch_groups
        ):
            rounds.append(self._score(self._local_share(self._next_prompts())))
        self._log_step(sampling_rounds=len(rounds))
        return rounds

    def _gather_rounds(self, rounds: list[ScoredRollout], needs_logps: torch.Tensor) -> dict[str, Any]:
        """Measures behavior log-probs of this process's rows that need them, then gathers every round."""
        gathered, first_group = [], 0
        for scored in rounds:
            batch, num_groups = scored.rows, len(scored.advantages) // self.num_generations
            groups = needs_logps[first_group : first_group + num_groups].nonzero().flatten()
            needed = group_rows(groups, self.num_generations)
            self._attach_behavior_logps(batch, self._local_rows(needed, num_rows(batch)))
            gathered.append(gather_batch(batch, self.accelerator, self._tokenizer.pad_token_id))
            first_group += num_groups
        return gathered[0] if len(gathered) == 1 else concat_batches(gathered, self._tokenizer.pad_token_id)

    def _next_prompts(self) -> list[dict[str, Any]]:
        """B more prompts, each repeated G times as TRL's sampler does, from a shuffled pass over the data."""
        rows = []
        for _ in range(self._batch_groups):
            if not self._prompt_order:
                self._prompt_order = torch.randperm(len(self.train_dataset), generator=self._generator).tolist()
            example = self.train_dataset[self._prompt_order.pop()]
            rows += [dict(example) for _ in range(self.num_generations)]
        return rows

    def _difficult_replay(self, t: int, room: int) -> Replay:
        """Lines 12-15, X2 (eq. 6): every m steps, regenerate prompts of B_bad with the current policy (the oldest,
        or with `reevaluation_order='random'` a random draw) and keep those `difficult_admission` admits: c1 < mu < 1,
        or a mu above the one the prompt entered with. With `cap_difficult_replay`, at most `room` groups.

        Prompts that are no longer difficult leave B_bad (unless `keep_reevaluated_prompts`), so the buffer keeps
        only what is still unsolved. The prompts are shared between processes with accelerate's split, padded by
        repeating the last prompt, because TRL gathers rewards across processes and expects every process to score
        as many rows; a prompt scored twice counts once.
        """
        args, group_size, c1 = self.args, self.num_generations, self.args.c1
        if not (args.use_difficult_replay and t % args.reevaluation_interval == 0 and len(self._difficult)):
            return Replay([], 0)
        if args.reevaluation_order == "random":
            examples = self._difficult.sample(args.max_reevaluation_prompts, self._generator)
        else:
            examples = self._difficult.oldest(args.max_reevaluation_prompts)
        with self.accelerator.split_between_processes(list(range(len(examples))), apply_padding=True) as share:
            with self._muted_metrics():
                scored = self._score([examples[i] for i in share for _ in range(group_size)])
            order = share if self.accelerator.num_processes == 1 else gather_object(share)
        self._attach_behavior_logps(scored.rows, torch.tensor([], dtype=torch.long))
        batch = gather_batch(scored.rows, self.accelerator, self._tokenizer.pad_token_id)
        self._rollouts += len(order) * group_size
        first = torch.tensor([order.index(i) for i in range(len(examples))])  # each prompt's first scored group
        accuracy = group_accuracy(scored.correct, group_size)[first]
        if args.difficult_admission == "improved":
            admitted = beats_mask(accuracy, torch.tensor([self._difficult.accuracy(ex) for ex in examples]))
        else:
            admitted = improved_mask(accuracy, c1)
        if not args.keep_reevaluated_prompts:
            self._difficult.remove([ex for ex, hard in zip(examples, difficult_mask(accuracy, c1)) if not hard])
        keep = first[admitted][: room if args.cap_difficult_replay else None]
        return Replay([select_rows(batch, group_rows(keep, group_size))], len(keep), reevaluated=len(examples))

    # ---- checkpoint state -----------------------------------------------------------------------------------

    def _bapo_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "processes": self.accelerator.num_processes,
            "sharded": self._dist.is_fsdp or self._dist.is_zero3,
            "settings": self._bapo_settings(),
            "rollout_step": self._rollout_step,
            "snapshot": self._snapshot.state_dict(),
            "difficult": self._difficult.state_dict(),
            "high_quality": self._high_quality.state_dict(),
            "generator": self._generator.get_state(),
            "reward_sum": self._reward_sum,
            "reward_count": self._reward_count,
            "rollouts": self._rollouts,
            "prompt_order": self._prompt_order,
        }

    def _bapo_settings(self) -> dict[str, int]:
        return {
            "rollout_delay": self._snapshot.delay,
            "difficult_buffer_size": self._difficult.capacity,
            "high_quality_buffer_steps": self._high_quality.window,
        }

    def _load_bapo_state(self, checkpoint: str) -> None:
        """Reads this process's state file, then decides together with every other process whether to resume
        from the states: if any process cannot read its own, none resumes from them, so no process runs on with
        buffers the others lack."""
        rank = self.accelerator.process_index
        state, error = None, None
        try:
            state = self._checked_state(self._own_state(checkpoint))
        except UNREADABLE as caught:
            error = f"process {rank} could not read {state_file(checkpoint, rank)} ({unreadable_reason(caught)})"
        except (KeyError, ValueError) as caught:
            error = f"process {rank} could not use {state_file(checkpoint, rank)} ({type(caught).__name__}: {caught})"
        errors = [e for e in (gather_object([error]) if self.accelerator.num_processes > 1 else [error]) if e]
        if not errors:
            self._apply_bapo_state(state)
            return
        if not self.args.resume_without_bapo_state:
            raise ValueError(
                f"Cannot resume BAPO from {checkpoint}: {'; '.join(errors)}. Resuming without that state would "
                "silently empty the buffers and reset the thresholds and the rollout policy. "
                f"{resume_advice(checkpoint)} or set resume_without_bapo_state=True to start with empty buffers."
            )
        logger.warning("Resuming from %s with empty BAPO buffers: %s", checkpoint, "; ".join(errors))

    def _own_state(self, checkpoint: str) -> dict[str, Any]:
        """This process's state file; on a process the checkpoint's writers did not have (it was written by fewer
        processes), file 0, which holds the shared parts. A file missing on a process that did write is an error:
        another process's shards are no rollout policy of its own."""
        rank = self.accelerator.process_index
        path = state_file(checkpoint, rank)
        if rank == 0 or os.path.exists(path):
            return read_state(path)
        state = read_state(state_file(checkpoint, 0))
        if rank < state["processes"]:
            raise FileNotFoundError(f"missing, though {state['processes']} processes wrote this checkpoint")
        return state

    def _checked_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state`, with its snapshot dropped where it cannot be placed: shards of another number of processes."""
        if state["version"] != STATE_VERSION:
            raise ValueError(f"state version {state['version']}, this trl-bapo reads version {STATE_VERSION}")
        if state["sharded"] and state["processes"] != self.accelerator.num_processes:
            logger.warning(
                "The checkpoint's rollout snapshot holds the shards of %d processes, not %d; the rollout policy "
                "restarts from the current weights on the first step.",
                state["processes"],
                self.accelerator.num_processes,
            )
            state["snapshot"] = {"step": None, "weights": {}}
        policy = self.accelerator.unwrap_model(self.model)
        shards = {name: local_shard(param) for name, param in trainable_parameters(policy).items()}
        for name, tensor in state["snapshot"]["weights"].items():
            if name not in shards or shards[name].shape != tensor.shape:
                raise ValueError(f"its rollout snapshot does not fit this model: parameter {name!r} differs")
        return state

    def _apply_bapo_state(self, state: dict[str, Any]) -> None:
        for name, current in self._bapo_settings().items():
            if state["settings"][name] != current:
                logger.warning(
                    "%s was %s in the checkpoint and is %s now; the configured value applies.",
                    name,
                    state["settings"][name],
                    current,
                )
        self._snapshot.load_state_dict(state["snapshot"])
        self._difficult.load_state_dict(state["difficult"])
        self._high_quality.load_state_dict(state["high_quality"])
        self._generator.set_state(state["generator"])
        self._rollout_step, self._rollouts = state["rollout_step"], state["rollouts"]
        self._reward_sum, self._reward_count = state["reward_sum"], state["reward_count"]
        self._prompt_order = state["prompt_order"]

    # ---- helpers --------------------------------------------------------------------------------------------

    @property
    def _r_tot(self) -> float:
        """Global average training reward over every fresh completion so far (eq. 8)."""
        return self._reward_sum / self._reward_count if self._reward_count else 0.0

    def _score(self, inputs: list[dict[str, Any]]) -> ScoredRollout:
        """TRL's generation and scoring of this process's rows."""
        started = time.perf_counter()
        with self._reference_kl_off():
            batch = self._generate_and_score_completions(inputs)
        self._scoring_seconds += time.perf_counter() - started
        # Image fields become one entry per row (TRL's own split), so rows can be selected, stored and replayed.
        batch = split_pixel_values_by_grid(batch)
        # Whether a group has a learning signal is TRL's call (its advantages, under any reward aggregation);
        # whether a completion is correct is BAPO's: its weighted reward, or the reward `correctness_reward` names.
        advantages = (
            batch["advantages"]
            if self.accelerator.num_processes == 1
            else self.accelerator.gather(batch["advantages"])
        )
        per_func = self._last_rewards_per_func
        if self._correctness_column is not None:
            correct = correct_completions(per_func[:, self._correctness_column].cpu(), self.args.correctness_threshold)
        else:
            correct = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1).cpu()
            correct[torch.isnan(per_func).all(dim=1).cpu()] = math.nan
            self._warn_if_not_accuracy(correct)
        examples = inputs if self.accelerator.num_processes == 1 else gather_object(inputs)
        return ScoredRollout(batch, advantages.cpu(), correct, examples)

    def _warn_if_not_accuracy(self, rewards: torch.Tensor) -> None:
        finite = rewards[~torch.isnan(rewards)]
        if self._warned_reward_range or not ((finite < 0) | (finite > 1)).any():
            return
        self._warned_reward_range = True
        logger.warning(
            "Rewards range over [%.3g, %.3g], but BAPO reads their mean per group as accuracy: the thresholds c1, c2, "
            "c3 and the range filter assume rewards in [0, 1]. Set correctness_reward (and correctness_threshold) to "
            "the reward that says whether a completion is right.",
            float(finite.min()),
            float(finite.max()),
        )

    def _local_share(self, rows: list) -> list:
        """This process's contiguous share of a list that every process holds, as TRL's sampler splits it."""
        share = len(rows) // self.accelerator.num_processes
        return rows[self.accelerator.process_index * share : (self.accelerator.process_index + 1) * share]

    def _local_rows(self, rows: torch.Tensor, local_count: int) -> torch.Tensor:
        """The rows, given in gathered numbering, that this process holds, in its own numbering."""
        first = self.accelerator.process_index * local_count
        return rows[(rows >= first) & (rows < first + local_count)] - first

    def _shared_permutation(self, count: int) -> torch.Tensor:
        """TRL's shuffle draws from the global RNG, which drifts apart across processes during generation; every
        process takes process 0's draw so they cut the same batch the same way."""
        permutation = torch.randperm(count).to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            permutation = broadcast(permutation, from_process=0)
        return permutation.cpu()

    def _forward_logps(
        self, model, batch: dict[str, Any], with_grad: bool = False, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-token log-probs of `batch`'s completions through TRL's forward; with gradient also the entropies and,
        for a Mixture-of-Experts model whose auxiliary loss TRL adds, that loss."""
        batch = unsplit_pixel_values_by_grid(batch)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        return self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            batch["completion_ids"].size(1),
            batch_size=batch_size,
            compute_entropy=with_grad,
            compute_aux_loss=with_grad and self.aux_loss_enabled,
            **{key: batch[key] for key in MULTIMODAL_FIELDS if key in batch},
        )

    def _gathered_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of `values` over the masked tokens of every process, as TRL logs its loss metrics."""
        totals = self._sum_processes(torch.stack([(values.detach() * mask).sum(), mask.sum()]))
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _sum_processes(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values, reduction="sum") if self.accelerator.num_processes > 1 else values

    def _policy_logps(self, batch: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs of the completions of `rows` under the weights now in the model.

        Every process calls this at the same points. Where a forward is a collective (FSDP, ZeRO-3), each runs as
        many forward passes as the process with the most rows, repeating its first row where it has fewer."""
        count = len(rows)
        if self._collective_forwards:
            counts = self.accelerator.gather(torch.tensor([count], device=self.accelerator.device))
            rows = torch.cat([rows, rows.new_zeros(int(counts.max()) - count)])
        if not len(rows):
            return torch.empty(0, batch["completion_ids"].size(1), device=batch["completion_ids"].device)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._forward_logps(
                self.model, select_rows(batch, rows), batch_size=self.args.per_device_train_batch_size
            )
        return logps[:count]

    def _attach_behavior_logps(self, batch: dict[str, Any], rows: torch.Tensor) -> None:
        """Fills `old_per_token_logps` for `rows` with the log-probs of the weights now in the model, the policy
        that generated them; other rows get NaN, meaning "generated by the current policy, not measured yet".

        Keeps what TRL already measured: with vLLM and TRL's importance-sampling correction on, TRL measured the
        generating policy in the trainer and weighs the engine's mismatch itself. With the correction off, the
        engine's own log-probs are the behavior log-probs; a token the engine returned no log-prob for (NaN) gets
        the trainer's, measured now, while the generating policy is still in the model."""
        sampled = batch.get("sampling_per_token_logps")
        if sampled is not None and not self.vllm_importance_sampling_correction:
            unscored = torch.isnan(sampled) & batch["completion_mask"].bool()
            nan_rows = unscored.any(dim=1).nonzero().flatten()
            behavior = sampled.clone()
            measured = self._policy_logps(batch, nan_rows)
            behavior[nan_rows] = torch.where(unscored[nan_rows], measured, sampled[nan_rows])
            batch[BEHAVIOR_LOGPS] = torch.nan_to_num(behavior * batch["completion_mask"], nan=0.0)
            return
        if BEHAVIOR_LOGPS in batch:
            return
        logps = torch.full(batch["completion_mask"].shape, math.nan, device=batch["completion_mask"].device)
        logps[rows.to(logps.device)] = self._policy_logps(batch, rows)
        batch[BEHAVIOR_LOGPS] = logps

    def _finish_behavior_logps(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """Makes a micro-batch's behavior log-probs whole, or drops them when every row is on-policy and nothing
        needs them: TRL then takes the ratio against the detached current log-probs, exactly as GRPO does. With
        `off_policy_correction="decoupled"`, anchors the ratio at the policy that starts the step instead."""
        if self.args.off_policy_correction == "decoupled":
            return self._decouple(chunk)
        logps = chunk[BEHAVIOR_LOGPS]
        missing = unmeasured_rows(logps)
        on_policy = bool(missing.all()) and not self._behavior_kl
        rows = missing.nonzero().flatten()
        measured = self._policy_logps(chunk, rows[:0] if on_policy else rows)
        if on_policy:
            chunk.pop(BEHAVIOR_LOGPS)
            return chunk
        logps[rows] = measured
        if self._behavior_kl:
            chunk["ref_per_token_logps"] = logps
        return chunk

    def _decouple(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """The decoupled form of the loss: the clipped ratio's anchor is pi_start, the policy at the start of this
        rollout step (the weights in the model while the batch is cut), measured for every row; the policy that
        generated a row enters only through its truncated importance weight min(pi_start / pi_behavior, cap). A
        row generated by the current policy (its behavior log-probs unmeasured) weighs 1."""
        behavior = chunk[BEHAVIOR_LOGPS]
        start = self._policy_logps(chunk, torch.arange(num_rows(chunk)))
        behavior = torch.where(torch.isnan(behavior), start, behavior)
        mask = loss_mask(chunk).bool()
        ratio = torch.where(mask, torch.exp(start - behavior), torch.ones_like(start))
        chunk[IMPORTANCE_WEIGHT] = ratio.clamp(max=self.args.importance_sampling_cap)
        chunk[BEHAVIOR_LOGPS] = start
        if self._behavior_kl:
            chunk["ref_per_token_logps"] = behavior
        self._weight_stats.append(
            source_weight_stats(
                chunk[IMPORTANCE_WEIGHT], ratio, mask, chunk.get(SOURCE), self.args.importance_sampling_cap
            )
        )
        return chunk

    def _log_step(self, **values: float) -> None:
        for name, value in values.items():
            self._metrics["train"][f"bapo/{name}"].append(float(value))

    @contextmanager
    def _reference_kl_off(self) -> Iterator[None]:
        # With the behavior-policy KL there is no reference model; TRL would try to score one while beta != 0.
        beta = self.beta
        if self._behavior_kl:
            self.beta = 0.0
        try:
            yield
        finally:
            self.beta = beta

    @contextmanager
    def _muted_metrics(self) -> Iterator[None]:
        # Re-evaluation goes through TRL's scoring, which would log its rewards as the training reward and its
        # completions in the completions table (`log_completions`) as if they were the training rollout.
        metrics, logs = self._metrics["train"], self._logs
        self._metrics["train"], self._logs = defaultdict(list), copy.deepcopy(logs)
        try:
            yield
        finally:
            self._metrics["train"], self._logs = metrics, logs


class FrozenStep(TrainerCallback):
    """Keeps the optimizer steps of an empty assembled batch from moving the weights.

    A zero gradient still moves them through Adam's momentum and weight decay, so those steps run at learning rate
    0, set through the optimizer's `param_groups`, which every engine's optimizer exposes (DeepSpeed's ZeRO
    optimizers included). The trainer calls `hold` before each micro-batch's backward pass, where DeepSpeed takes
    its step; the rate comes back right after the step, before the scheduler reads it, unless an engine's own
    scheduler has already set a new one.
    """

    def __init__(self):
        self._rates: list[float] | None = None

    def hold(self, optimizer) -> None:
        if self._rates is None:
            self._rates = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._rates is None:
            return
        for group, rate in zip(optimizer.param_groups, self._rates):
            if group["lr"] == 0.0:
                group["lr"] = rate
        self._rates = None
