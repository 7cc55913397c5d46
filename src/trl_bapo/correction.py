"""The decoupled off-policy correction (`off_policy_correction="decoupled"`), as the authors' code trains.

Eq. 3 of the paper takes the clipped ratio against the policy that generated each sample. The authors' code
(verl fork, `rollout_is_level: token`, `rollout_is_mode: truncate`) decouples the two roles: the proximal anchor of
the clipped ratio is pi_start, the policy at the start of the rollout step, and the policy that generated a sample
enters through a truncated token-level importance weight w = min(pi_start / pi_behavior, cap), which multiplies the
token's loss.

TRL multiplies the per-token loss by its own vLLM importance weight only when vLLM is on (trl 1.16.0,
`GRPOTrainer._compute_loss`). Every TRL loss but VESPO is linear in the advantage, and w > 0 keeps its sign, so the
same product comes from multiplying each token's advantage by w, with or without vLLM; with vLLM's correction on,
TRL's weight (pi_behavior measured by the trainer over the engine's) multiplies on top, so the two compose to
pi_start over the engine's policy.

For X3, the authors anchor at the policy that started the step the group was generated in, with the importance
weight of that moment (`x3_anchor="stored"`): pi_start then, measured when the group is stored and kept with it.
"""

from __future__ import annotations

from typing import Any

import torch

SOURCES = ("x1", "x2", "x3")  # row tags 1, 2, 3 of the assembled batch
SOURCE = "bapo_source"  # the batch field of those tags, one per row
IMPORTANCE_WEIGHT = "bapo_importance_weight"  # the batch field of w, one per token
# With `x3_anchor="stored"`: pi_start of the step a row was generated in, one per token, stored with the groups X3 may
# replay; NaN rows are measured when their micro-batch is cut.
ANCHOR_LOGPS = "bapo_anchor_logps"


def weighted_advantages(inputs: dict[str, Any], weight: torch.Tensor) -> dict[str, Any]:
    """`inputs` with each token's advantage multiplied by its importance weight (shape (rows, tokens))."""
    advantages = inputs["advantages"]
    return {**inputs, "advantages": (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages) * weight}


def source_weight_stats(
    weight: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor, source: torch.Tensor | None, cap: float
) -> torch.Tensor:
    """Per source (X1, X2, X3) over a micro-batch's loss tokens: [sum of weights, tokens, largest weight, tokens
    whose ratio the cap truncated]."""
    stats = torch.zeros(len(SOURCES), 4)
    if source is None:  # a micro-batch of filler rows only
        return stats
    for index in range(len(SOURCES)):
        tokens = mask & (source == index + 1).unsqueeze(1).to(mask.device)
        held = weight[tokens].float().cpu()
        if held.numel():
            truncated = (ratio[tokens] > cap).sum().cpu()
            stats[index] = torch.stack([held.sum(), torch.tensor(float(held.numel())), held.max(), truncated.float()])
    return stats


def weight_metrics(stats: torch.Tensor) -> dict[str, float]:
    """`bapo/` metrics from stats summed over micro-batches and processes (largest weights: their maximum), for
    every source that had tokens: the weight's mean, its maximum and the share of tokens truncated."""
    metrics = {}
    for index, name in enumerate(SOURCES):
        total, tokens, largest, truncated = stats[index].tolist()
        if tokens:
            metrics[f"{name}/is_weight_mean"] = total / tokens
            metrics[f"{name}/is_weight_max"] = largest
            metrics[f"{name}/is_truncated"] = truncated / tokens
    return metrics


def combine_stats(per_micro_batch: list[torch.Tensor]) -> torch.Tensor:
    """Stats of several micro-batches as one: sums, and the maximum of the largest weights."""
    stacked = torch.stack(per_micro_batch)
    combined = stacked.sum(dim=0)
    combined[:, 2] = stacked[:, :, 2].max(dim=0).values
    return combined


def gathered_weight_metrics(accelerator, per_micro_batch: list[torch.Tensor]) -> dict[str, float]:
    """The metrics of a rollout step's micro-batches on every process (each has as many)."""
    stats = combine_stats(per_micro_batch)
    if accelerator.num_processes > 1:
        stats = combine_stats(list(accelerator.gather(stats.to(accelerator.device)[None]).cpu()))
    return weight_metrics(stats)
