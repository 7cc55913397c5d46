"""`BAPOTrainer`: TRL's GRPOTrainer with Batch Adaptation Policy Optimization (Algorithm 1, appendix A.8).

It reads top to bottom as construction, then Algorithm 1's rollout step, then the few overrides of TRL (checked
against trl 1.16.0 and transformers 5.23; the private parts of TRL it touches are named in `trl_bapo.trl_private`):
- `_prepare_inputs`: on generation steps, builds the training batch X1 + X2 + X3 instead of using the fresh rollout
  as is, and cuts it with BAPO's own rule (TRL's `split_tensor_dict` drops rows that do not divide);
- `_calculate_rewards`: calls TRL's and keeps the gathered rewards per function, which say which completions are
  correct (TRL's advantages say which groups carry a learning signal);
- `compute_loss`: TRL's loss, or one of `trl_bapo.losses`' own, scaled by the micro-batch's share of the batch;
- `_save_optimizer_and_scheduler` / `_load_optimizer_and_scheduler`: BAPO's state beside the optimizer's in every
  checkpoint (`trl_bapo.checkpoint`); transformers calls both on every process, before any push to the Hub;
- `_save_checkpoint` / `train`: a checkpoint is marked complete once every file is on disk, and
  `resume_from_checkpoint=True` resumes from the newest complete one;
- `__init__`: with `kl_reference="behavior"`, keeps TRL from building a reference model that KL never reads
  (`trl_bapo.kl`, where beta's meaning is decided); in server mode, has TRL build BAPO's vLLM generation, which
  connects without NCCL where a PEFT model's adapter goes to the server by file (`trl_bapo.lora_sync`).
- `_generate_single_turn` / `get_batch_samples`: the engine call, with per-step seeds or taken from the background
  call that generated it while the step before trained (`trl_bapo.overlap`), which reads prompts ahead through
  transformers' read of the train dataloader.

Everything else, generation, reward scoring, advantages and the clipped surrogate, is TRL's. The behavior
log-probs of every sample travel in TRL's `old_per_token_logps` (`trl_bapo.behavior`). With vLLM, BAPO decides
when the engine gets weights (`trl_bapo.vllm_sync.EngineWeights`), so it holds alpha at every rollout. Image
fields are split per row and merged back with TRL's `split_pixel_values_by_grid` / `unsplit_pixel_values_by_grid`.
Under FSDP2 and DeepSpeed the rollout snapshot holds each process's own shards (`trl_bapo.engines`).
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
import time
from contextlib import nullcontext
from typing import Any

import torch
from accelerate.utils import send_to_device
from transformers.trainer_utils import rotate_checkpoints
from transformers.utils import logging
from trl import GRPOTrainer
from trl.trainer.utils import (
    get_config_model_id,
    unsplit_pixel_values_by_grid,
)

from trl_bapo.batch import concat_batches, cut_batch, gather_batch, loss_mask, masked_row, num_rows, select_rows
from trl_bapo.behavior import attach_anchor_logps, attach_behavior_logps, finish_behavior_logps
from trl_bapo.buffers import BAPOStatus
from trl_bapo.checkpoint import load_state, mark_complete, newest_complete_checkpoint, save_state, unmark
from trl_bapo.clipping import adaptive_clipping
from trl_bapo.config import BAPOConfig
from trl_bapo.correction import IMPORTANCE_WEIGHT, SOURCE, gathered_weight_metrics, weighted_advantages
from trl_bapo.distributed import local_rows, local_share, shared_permutation
from trl_bapo.frozen_step import FrozenStep
from trl_bapo.kl import behavior_kl, no_reference_model, reference_kl_off
from trl_bapo.lora_sync import has_image_column, server_generation
from trl_bapo.losses import LOSSES, own_loss
from trl_bapo.overlap import EngineCalls, check_overlap
from trl_bapo.preflight import check_datasets, check_output_dir, check_trainer, constructor_arguments
from trl_bapo.progress import progress_state, restore_progress
from trl_bapo.records import FreshRollout, Replay, ScoredRollout
from trl_bapo.scoring import (
    Correctness,
    check_correctness_reward,
    finite_rewards,
    sampled_accuracies,
    score,
    score_prompts,
)
from trl_bapo.selection import (
    group_accuracy,
    group_has_variance,
    group_rows,
    online_filter_mask,
    x3_room,
)
from trl_bapo.snapshots import SNAPSHOT_FILE, BufferSnapshots, buffer_lines, write_lines
from trl_bapo.staleness import clip_fractions, lag_metrics
from trl_bapo.state import BAPOState
from trl_bapo.tracking import PromptTracking
from trl_bapo.vllm_sync import EngineWeights

logger = logging.get_logger(__name__)


class BAPOTrainer(GRPOTrainer):
    """Drop-in for `trl.GRPOTrainer` that trains on BAPO's adaptive batch. Takes the same arguments; `args`
    must be a `BAPOConfig`."""

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
        check_correctness_reward(args.correctness_reward, reward_funcs)
        given = constructor_arguments(model, reward_funcs, args, *more, **kwargs)
        check_datasets(given.get("train_dataset"), given.get("eval_dataset"), given.get("environment_factory"))
        check_output_dir(args.output_dir)
        image_prompts = has_image_column(given.get("train_dataset"), given.get("eval_dataset"))
        with no_reference_model(args), server_generation(args, image_prompts):
            super().__init__(model, reward_funcs, args, *more, **kwargs)
        self.beta = args.beta
        check_trainer(self)
        # Under FSDP and ZeRO-3 each process holds shards of the parameters, and every forward is a collective that
        # all processes must enter together.
        self._sharded = self._dist.is_fsdp or self._dist.is_zero3
        self._collective_forwards = self.accelerator.num_processes > 1 and self._sharded
        self._correctness = Correctness(args.correctness_reward, args.correctness_threshold, self)
        check_overlap(self)
        self._engine_calls = EngineCalls(self)

        self._bapo = BAPOState.from_config(args, args.generation_batch_size // self.num_generations)
        # Per rollout step, not Algorithm 1's lasting state:
        self._skipped_updates: list[bool] = []  # per optimizer step of the current rollout step
        self._scoring_seconds = 0.0  # spent in TRL's generation and scoring during this rollout step
        self._frozen_step = FrozenStep()
        self.add_callback(self._frozen_step)
        self._last_rewards_per_func: torch.Tensor | None = None
        self._weight_stats: list[torch.Tensor] = []  # the decoupled correction's, per micro-batch of this step
        self._engine = EngineWeights(self)
        if args.track_prompts:
            self.add_callback(PromptTracking(self, self._tracked_accuracies))
        if args.log_buffer_snapshots:
            self.add_callback(BufferSnapshots(self._bapo, self.accelerator))

    @property
    def bapo_status(self) -> BAPOStatus:
        """A read-only copy of BAPO's buffers, thresholds and counters as they stand after the last rollout step, and
        which reward defines a correct completion."""
        return dataclasses.replace(self._bapo.status(), correctness=self._correctness.description)

    # ---- Algorithm 1, one rollout step ---------------------------------------------------------------------

    def _assemble_batch(self, inputs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Runs rollout step t (lines 2-17 of Algorithm 1) and returns the training batch X1 + X2 + X3 and a
        loss-free filler row (which keeps the batch's fields, so it can share a micro-batch with real rows).

        Decisions are taken on the rollout gathered from every process, so they are the same everywhere.
        """
        t, after_update = self._bapo.next_rollout_step(), self.args.difficult_entry_after_update
        fresh = self._fresh_rollout(inputs, t)
        store = dict(fresh=fresh, t=t, group_size=self.num_generations)
        if not after_update:
            self._bapo.store(**store, difficult=self.args.use_difficult_replay, high_quality=False)  # line 8
        x1 = select_rows(fresh.rows, group_rows(fresh.x1.nonzero().flatten(), self.num_generations))
        num_x1 = int(fresh.x1.sum())
        x2 = self._difficult_replay(t, room=x3_room(self._bapo.batch_groups, num_x1, 0))
        x3 = self._high_quality_replay(t, fresh, room=x3_room(self._bapo.batch_groups, num_x1, x2.groups))
        self._bapo.store(  # line 9, and line 8 after the update
            **store,
            difficult=after_update and self.args.use_difficult_replay,
            high_quality=self.args.use_high_quality_replay,
        )
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
            batch_fill=(num_x1 + x2.groups + x3.groups) / self._bapo.batch_groups,
            difficult_buffer=len(self._bapo.buffers.difficult_entries()),
            high_quality_buffer=len(self._bapo.buffers.high_quality_entries()),
            c2=fresh.c2,
            c3=fresh.c3,
            r_tot=self._bapo.r_tot,
            rollouts=self._bapo.rollouts,
            reevaluated=x2.reevaluated,
            policy_lag=fresh.lag,
            skipped=float(num_rows(batch) == 0),
            **lag_metrics({"x1": [fresh.lag] * num_x1, "x2": [0] * x2.groups, "x3": x3.lags}),
        )
        return batch, masked_row(batch if num_rows(batch) else fresh.rows)

    def _fresh_rollout(self, inputs: list[dict[str, Any]], t: int) -> FreshRollout:
        """Lines 3-7 and 11: refresh alpha when t mod v = 0, generate and score X_on with alpha, and decide which
        groups the online filter keeps (X1) and whose rows the buffers keep for replay."""
        args, group_size = self.args, self.num_generations
        policy = self.accelerator.unwrap_model(self.model)
        refreshed = self._bapo.snapshot.maybe_refresh(policy, t)
        self._engine.alpha(policy, t, refreshed)
        lag = self._bapo.snapshot.lag(t)
        with self._bapo.snapshot.applied(policy, t):
            rounds = self._sample_fresh(inputs)
            correct = torch.cat([scored.correct for scored in rounds])
            accuracy = group_accuracy(correct, group_size)
            self._bapo.record_rewards(correct)
            _, c2, c3 = self._bapo.thresholds()
            x1 = online_filter_mask(
                accuracy,
                group_has_variance(torch.cat([scored.advantages for scored in rounds]), group_size),
                args.online_filter,
                self._bapo.generator,
                args.online_filter_gaussian_mean,
                args.online_filter_gaussian_std,
                args.online_filter_uniform_keep,
            )
            if args.online_filter_fallback and not x1.any():
                x1 = torch.ones_like(x1)
            if args.dynamic_sampling:
                x1 &= x1.cumsum(0) <= self._bapo.batch_groups  # DAPO trains on exactly B groups when it has them
            kept = self._bapo.buffers.keeps_rows(
                accuracy, c2, c3, args.use_difficult_replay, args.use_high_quality_replay
            )
            # Behavior log-probs are taken now, while alpha is in the model: for X1 when it is off-policy or
            # the KL needs them, and for every group kept for later replay.
            self._measure_rounds(rounds, kept | (x1 & (lag > 0 or behavior_kl(args))), attach_behavior_logps)
        if args.x3_anchor == "stored":  # pi_start of this step, stored with the groups X3 may replay
            self._measure_rounds(rounds, kept, attach_anchor_logps)
        gathered = [gather_batch(scored.rows, self.accelerator, self._tokenizer.pad_token_id) for scored in rounds]
        rows = gathered[0] if len(gathered) == 1 else concat_batches(gathered, self._tokenizer.pad_token_id)
        examples = [example for scored in rounds for example in scored.examples]
        self._bapo.count_rollouts(len(examples))
        return FreshRollout(rows, examples, accuracy, x1, kept, c2, c3, lag)

    def _high_quality_replay(self, t: int, fresh: FreshRollout, room: int) -> Replay:
        """Line 16: X3, at most `room` groups drawn from B_high's groups of earlier steps with c2 <= mu <= c3."""
        device = fresh.rows["completion_ids"].device
        replayed = self._bapo.buffers.draw_replay(t, fresh.c2, fresh.c3, room, self._bapo.generator)
        lags = [t - group.policy_step for group in replayed]
        return Replay([send_to_device(group.rows, device) for group in replayed], len(replayed), lags=lags)

    def _sample_fresh(self, inputs: list[dict[str, Any]]) -> list[ScoredRollout]:
        """X_on: one rollout batch, or with `dynamic_sampling` as many as DAPO draws (at most
        `dynamic_sampling_max_rounds`) until B groups have non-zero reward variance."""
        rounds = [score(self, inputs)]
        while (
            self.args.dynamic_sampling
            and len(rounds) < self.args.dynamic_sampling_max_rounds
            and sum(int(group_has_variance(s.advantages, self.num_generations).sum()) for s in rounds)
            < self._bapo.batch_groups
        ):
            prompts = self._bapo.next_prompts(self.train_dataset, self.num_generations)
            rounds.append(score(self, local_share(self.accelerator, prompts)))
        if self.args.dynamic_sampling:
            self._log_step(sampling_rounds=len(rounds))
        self._scoring_seconds += sum(scored.seconds for scored in rounds)
        return rounds

    def _measure_rounds(self, rounds: list[ScoredRollout], groups: torch.Tensor, attach) -> None:
        """Runs `attach` (a log-prob measurement of `trl_bapo.behavior`) on this process's rows of the given groups
        (numbered over every process's rounds) with the weights now in the model."""
        first_group = 0
        for scored in rounds:
            batch, num_groups = scored.rows, len(scored.advantages) // self.num_generations
            chosen = groups[first_group : first_group + num_groups].nonzero().flatten()
            needed = group_rows(chosen, self.num_generations)
            attach(self, batch, local_rows(self.accelerator, needed, num_rows(batch)))
            first_group += num_groups

    def _difficult_replay(self, t: int, room: int) -> Replay:
        """Lines 12-15, X2 (eq. 6): every m steps, regenerate prompts of B_bad with the current policy (the oldest,
        or with `reevaluation_order='random'` a random draw) and keep those `difficult_admission` admits: c1 < mu < 1,
        or a mu above the one the prompt entered with. With `cap_difficult_replay`, at most `room` groups.

        Prompts that are no longer difficult leave B_bad (unless `keep_reevaluated_prompts`), so the buffer keeps
        only what is still unsolved.
        """
        args, group_size = self.args, self.num_generations
        if not (args.use_difficult_replay and t % args.reevaluation_interval == 0):
            return Replay([], 0)
        groups = self._bapo.buffers.draw_reevaluation(
            args.max_reevaluation_prompts, args.reevaluation_order, self._bapo.generator
        )
        if not groups:
            return Replay([], 0)
        self._engine.current(alpha_is_current=self._bapo.snapshot.lag(t) == 0)
        scored, first = score_prompts(self, [group.example for group in groups])
        self._scoring_seconds += scored.seconds
        attach_behavior_logps(self, scored.rows, torch.tensor([], dtype=torch.long))
        if args.x3_anchor == "stored":
            attach_anchor_logps(self, scored.rows, torch.tensor([], dtype=torch.long))
        batch = gather_batch(scored.rows, self.accelerator, self._tokenizer.pad_token_id)
        self._bapo.count_rollouts(len(scored.correct))
        outcomes = scored.correct.view(-1, group_size)[first]
        accuracy = group_accuracy(outcomes.reshape(-1), group_size)
        admitted = self._bapo.buffers.after_reevaluation(
            groups, accuracy.tolist(), outcomes.tolist(), args.keep_reevaluated_prompts, args.difficult_admission
        )
        keep = first[torch.tensor(admitted, dtype=torch.bool)][: room if args.cap_difficult_replay else None]
        return Replay([select_rows(batch, group_rows(keep, group_size))], len(keep), reevaluated=len(groups))

    # ---- TRL overrides -------------------------------------------------------------------------------------

    def _prepare_inputs(self, generation_batch: dict[str, torch.Tensor | Any]) -> dict[str, torch.Tensor | Any]:
        if not self.model.training:
            return self._evaluation_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            started, self._scoring_seconds = time.perf_counter(), 0.0
            batch, filler = self._assemble_batch(generation_batch)
            chunks, self._skipped_updates = cut_batch(
                select_rows(batch, shared_permutation(self.accelerator, num_rows(batch))),
                self.args,
                self.accelerator.num_processes,
                LOSSES[self.loss_type].normalisation,
                filler,
                self._tokenizer.pad_token_id,
            )
            self._log_step(optimizer_steps=len(self._skipped_updates) - sum(self._skipped_updates))
            steps, rank = self.args.steps_per_generation, self.accelerator.process_index
            self._weight_stats = []
            self._buffered_inputs = [
                unsplit_pixel_values_by_grid(finish_behavior_logps(self, chunk))
                for chunk in chunks[rank * steps : (rank + 1) * steps]
            ]
            if self._weight_stats:  # the decoupled correction's weights
                self._log_step(**gathered_weight_metrics(self.accelerator, self._weight_stats))
            # BAPO's own work on this rollout step: assembly and the behavior log-prob forwards it adds.
            self._log_step(assembly_seconds=time.perf_counter() - started - self._scoring_seconds)
            self._log_step(**self._engine_calls.metrics())
            if self.args.overlap_rollout:
                self._engine_calls.start(generation_batch, self._bapo.rollout_step)
        if self._skipped_updates[self._step % self.args.steps_per_generation // self.args.gradient_accumulation_steps]:
            self._frozen_step.hold(self.optimizer)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _generate_single_turn(self, *inputs, **named):
        # trl 1.16.0's engine call: with per-step seeds, or prefetched, as `trl_bapo.overlap.EngineCalls` decides.
        trl_call = lambda: super(BAPOTrainer, self)._generate_single_turn(*inputs, **named)  # noqa: E731
        return self._engine_calls.generate(trl_call, *inputs, **named)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # transformers 5.23's one read of the train dataloader; a prefetch reads ahead through it.
        if self.args.overlap_rollout:
            epoch_iterator = self._engine_calls.read_ahead.wrap(epoch_iterator)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # Gathered: every process sees the same rewards, so every process stops, or goes on, alike.
        rewards_per_func, replaced = finite_rewards(
            rewards_per_func, self.reward_func_names, self.args.non_finite_rewards
        )
        if self.model.training:  # evaluation's rewards are not the training rollout's
            self._log_step(non_finite_rewards=replaced)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # transformers would take the newest checkpoint-N, even one whose save was killed or failed half-way.
        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true":
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._engine_calls.close()  # no background call outlives the run, however it ends
            self._engine.close()

    def evaluate(self, *args, **kwargs):
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if not self.is_in_train:  # inside training, train() unloads the server's adapters when it ends
                self._engine.close()

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        if self.args.should_save:  # an earlier run's complete checkpoint there is about to be rewritten
            unmark(folder)
        self.accelerator.wait_for_everyone()
        # transformers 5.25 deletes checkpoints beyond save_total_limit at the end of its save: only once this one is
        # marked complete, or a save killed before the marker would leave no complete checkpoint at all.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process's files, and the trainer's, are on disk
        if self.args.should_save:
            mark_complete(folder, self.state.global_step, self.accelerator.num_processes)
            best = self.state.best_model_checkpoint
            rotate_checkpoints(run_dir, limit, best_model_checkpoint=best, use_mtime=True)

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        run = {"progress": progress_state(self), "correctness": self._correctness.state_dict()}
        save_state(output_dir, self._bapo, self.accelerator, self._sharded, self.state.global_step, run)
        if self.is_world_process_zero():  # what the buffers hold, for people (the state file is for resuming)
            write_lines(os.path.join(output_dir, SNAPSHOT_FILE), buffer_lines(self._bapo))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            policy = self.accelerator.unwrap_model(self.model)
            allow_missing = self.args.resume_without_bapo_state
            run = load_state(checkpoint, self._bapo, self.accelerator, policy, self._sharded, allow_missing)
            if run is not None:
                self._correctness.load_state_dict(run.get("correctness"))
                restore_progress(self, run.get("progress"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            with reference_kl_off(self):
                return self._loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self._loss(model, inputs, return_outputs, num_items_in_batch)
        return loss * inputs["bapo_loss_scale"] if "bapo_loss_scale" in inputs else loss

    def _loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One of `trl_bapo.losses`' own, or TRL's: with the decoupled correction's weight in each token's
        advantage (`trl_bapo.correction`), and adaptive clipping's bounds when asked (`trl_bapo.clipping`)."""
        if LOSSES[self.loss_type].per_token is not None:
            return own_loss(self, model, inputs)
        if IMPORTANCE_WEIGHT in inputs:
            inputs = weighted_advantages(inputs, inputs[IMPORTANCE_WEIGHT])
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Adaptive clipping chooses its bounds inside TRL's forward; the clip fractions, counted after it, see them.
        with adaptive_clipping(self, inputs) if self.args.adaptive_clipping else nullcontext():
            with clip_fractions(self, inputs) if LOSSES[self.loss_type].clipped else nullcontext():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _evaluation_inputs(self, generation_batch: dict[str, torch.Tensor | Any]) -> dict[str, torch.Tensor | Any]:
        """TRL's evaluation, generating with the current policy. With the behavior-policy KL, the policy that
        generates the evaluation samples is the one evaluated, so the KL term is zero and no reference model is
        read (TRL would look for one, or measure against the base model under PEFT)."""
        self._engine.current()
        with reference_kl_off(self):
            return super()._prepare_inputs(generation_batch)

    def _tracked_accuracies(self, examples: list[dict[str, Any]]) -> list[float]:
        self._engine.current()
        return sampled_accuracies(self, examples, self._bapo.batch_groups)

    # ---- helpers --------------------------------------------------------------------------------------------

    def _log_step(self, **values: float) -> None:
        for name, value in values.items():
            self._metrics["train"][f"bapo/{name}"].append(float(value))
