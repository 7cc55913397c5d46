"""verl's side of the parity tests (tests/test_verl_parity.py): run in `.venv-verl`, which holds verl 0.9.1 (the
library the authors' BAPO forks) and no trl-bapo.

    .venv-verl/bin/python tests/verl_reference.py cases.pt results.pt

Each case names a computation and carries its tensors; the result holds verl's output and, for losses, the gradient
of the loss with respect to the current policy's log-probs. Every computation calls verl's own function:

- "policy_loss": `core_algos.compute_policy_loss_vanilla` with token-level rollout importance weights and the dual
  clip, aggregated as verl 0.9.1 does over a mini-batch: each micro-batch's `agg_loss("token-mean")` with the
  mini-batch's token count (`global_batch_info`), summed over the micro-batches.
- "fork_aggregation": the authors' fork's rule (github waunx/BAPO_ICLR, verl/workers/actor/dp_actor.py, line 475
  with `use_dynamic_bsz`): each micro-batch's local token mean, verl's `agg_loss("token-mean")` without global
  counts (which is the fork's `masked_mean`), times its rows over the mini-batch's rows per GPU, summed.
- "rollout_weights": `rollout_corr_helper.compute_rollout_correction_weights`, token level, truncated.
- "advantage": `core_algos.compute_grpo_outcome_advantage`, grouped by prompt index.
"""

import sys

import numpy as np
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_policy_loss_vanilla
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights
from verl.workers.config.actor import ActorConfig


def actor_config(case: dict, global_batch_info: dict) -> ActorConfig:
    config = ActorConfig(
        strategy="fsdp",
        rollout_n=case["group_size"],
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=case["clip_low"],
        clip_ratio_low=case["clip_low"],
        clip_ratio_high=case["clip_high"],
        clip_ratio_c=case["clip_c"],
    )
    config.global_batch_info.update(global_batch_info)
    return config


def summed_policy_loss(case: dict, global_batch_info: dict, row_weight) -> dict:
    """verl's policy loss of every micro-batch, times `row_weight(rows)`, summed as gradient accumulation sums them,
    with the gradient with respect to the current log-probs."""
    log_prob = case["log_prob"].clone().requires_grad_(True)
    total = 0.0
    for rows in case["micro_batches"]:
        loss, _ = compute_policy_loss_vanilla(
            old_log_prob=case["old_log_prob"][rows],
            log_prob=log_prob[rows],
            advantages=case["advantages"][rows],
            response_mask=case["mask"][rows],
            loss_agg_mode="token-mean",
            config=actor_config(case, global_batch_info),
            rollout_is_weights=case["weights"][rows],
        )
        total = total + loss * row_weight(rows)
    total.backward()
    return {"loss": total.detach(), "grad": log_prob.grad}


def policy_loss(case: dict) -> dict:
    """verl 0.9.1: token mean over the mini-batch's tokens (`global_batch_info`), one process."""
    return summed_policy_loss(case, {"dp_size": 1, "batch_num_tokens": case["mask"].sum()}, lambda rows: 1.0)


def fork_aggregation(case: dict) -> dict:
    """The fork: without global counts `agg_loss("token-mean")` is each micro-batch's own token mean (the fork's
    `masked_mean`), which its dp_actor scales by the micro-batch's rows over the mini-batch's rows per GPU."""
    return summed_policy_loss(case, {}, lambda rows: len(rows) / case["mini_batch_rows"])


def rollout_weights(case: dict) -> dict:
    weights, _ = compute_rollout_correction_weights(
        case["log_ratio"], case["mask"], rollout_is="token", rollout_is_threshold=case["threshold"]
    )
    return {"weights": weights}


def advantage(case: dict) -> dict:
    rewards = case["rewards"]
    kwargs = {} if case["epsilon"] is None else {"epsilon": case["epsilon"]}
    advantages, _ = compute_grpo_outcome_advantage(
        token_level_rewards=rewards.unsqueeze(1),
        response_mask=torch.ones(len(rewards), 1, dtype=rewards.dtype),
        index=np.array(case["index"]),
        **kwargs,
    )
    return {"advantages": advantages[:, 0]}


KINDS = {
    "policy_loss": policy_loss,
    "fork_aggregation": fork_aggregation,
    "rollout_weights": rollout_weights,
    "advantage": advantage,
}


def main(cases_path: str, results_path: str) -> None:
    cases = torch.load(cases_path, weights_only=True)
    torch.save([KINDS[case["kind"]](case) for case in cases], results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
