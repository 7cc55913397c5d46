"""Losses for stale data, as plain functions of per-token tensors: options beside TRL's loss types.

Notation (every tensor is (batch, tokens) unless said otherwise): `logps` are the current policy's per-token
log-probs (they carry the gradient), `old_logps` the behavior policy's, `advantages` one value per completion
broadcast over its tokens, `mask` the tokens that carry loss. Each function returns the per-token loss to minimise;
the trainer averages it over the micro-batch's tokens.

- Off-policy group-relative REINFORCE ("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm",
  arXiv 2509.24203): the REC family (clipping as regularisation), AsymRE (an optimistic baseline shift) and OPMD
  (online policy mirror descent: a squared log-ratio to the behavior policy).
- Adaptive clipping of Balanced Policy Optimization (arXiv 2510.18927): ratio bounds chosen per micro-batch so that
  positive-advantage tokens are not outweighed by negative ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# GRPOConfig's loss types (trl 1.16.0, GRPOTrainer._compute_loss), which TRL itself checks only at the first step.
TRL_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
OFF_POLICY_LOSSES = ("rec", "asymre", "opmd")
# REC variants of the paper: which ratios keep their gradient (the clip), and whether the importance ratio weighs it.
REC_VARIANTS = {
    "oneside-nois": ("one-side", False),
    "oneside-is": ("one-side", True),
    "twoside-nois": ("two-side", False),
    "twoside-is": ("two-side", True),
    "ring-nois": ("ring", False),
    "ring-is": ("ring", True),
}


def rec_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    variant: str,
    epsilon_low: float,
    epsilon_high: float,
    ring_epsilon_low: float,
    ring_epsilon_high: float,
) -> torch.Tensor:
    """REC: -A_hat * log pi * M, where the ratio rho = pi / pi_old (no gradient through it) decides M:

    - one-side: keep a token unless its ratio has already moved past the clip in its advantage's direction
      (A >= 0 and rho > 1 + eps_high, or A <= 0 and rho < 1 - eps_low): PPO's clip, as a mask;
    - two-side: keep 1 - eps_low <= rho <= 1 + eps_high;
    - ring: two-side, plus the tokens that moved far the wrong way (A >= 0 and rho <= 1 - ring_epsilon_low, or
      A <= 0 and rho >= 1 + ring_epsilon_high), which get their gradient back.

    A_hat is A (NoIS) or A * rho (IS: with one-side clipping, PPO's clipped surrogate gradient)."""
    clip, importance_sampling = REC_VARIANTS[variant]
    ratio = torch.exp(logps - old_logps).detach()
    positive, negative = advantages >= 0, advantages <= 0
    band = (ratio >= 1 - epsilon_low) & (ratio <= 1 + epsilon_high)
    if clip == "one-side":
        keep = (positive & (ratio <= 1 + epsilon_high)) | (negative & (ratio >= 1 - epsilon_low))
    elif clip == "two-side":
        keep = band
    else:
        keep = band | (positive & (ratio <= 1 - ring_epsilon_low)) | (negative & (ratio >= 1 + ring_epsilon_high))
    weight = advantages * ratio if importance_sampling else advantages
    return -weight * logps * keep


def asymre_loss(logps: torch.Tensor, advantages: torch.Tensor, tau: float) -> torch.Tensor:
    """AsymRE: REINFORCE with the baseline lowered by tau, -(A + tau) * log pi. The extra -tau * log pi is, in
    expectation over the behavior policy, tau * KL(pi_old || pi) up to a constant: it keeps pi near the data."""
    return -(advantages + tau) * logps


def opmd_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, tau: float) -> torch.Tensor:
    """OPMD: group-relative REINFORCE plus the mirror-descent regulariser (tau / 2) * (log pi - log pi_old)^2."""
    return -advantages * logps + tau / 2 * (logps - old_logps) ** 2


@dataclass
class ClipBounds:
    """Ratio bounds chosen for one micro-batch, and the clipped contributions they leave (summed over every
    process's tokens): positive-advantage tokens' and negative-advantage tokens' (as a positive number)."""

    low: float
    high: float
    positive: float
    negative: float


def adaptive_clip_bounds(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    start: tuple[float, float],
    step: float,
    maximum: tuple[float, float],
    target: float,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums,
) -> ClipBounds:
    """Balanced Policy Optimization's bounds: start from `start` = (low, high); while the positive tokens' clipped
    contribution over the negative tokens' is below `target`, raise low by `step` up to its maximum, then high by
    `step` up to its maximum. A token's contribution is A * min(rho, high) for A >= 0 and A * max(rho, low) for
    A < 0, as in the clipped surrogate. `all_reduce` sums the two totals over processes, so all pick the same."""

    def balance(low: float, high: float) -> tuple[float, float]:
        clipped = torch.where(advantages >= 0, ratio.clamp(max=high), ratio.clamp(min=low))
        contribution = advantages * clipped * mask
        sums = all_reduce(torch.stack([contribution.clamp(min=0).sum(), (-contribution).clamp(min=0).sum()]))
        return float(sums[0]), float(sums[1])

    def unbalanced(positive: float, negative: float) -> bool:
        return positive < target * negative

    low, high = start
    positive, negative = balance(low, high)
    while unbalanced(positive, negative) and low < maximum[0] - 1e-9:
        low = min(low + step, maximum[0])
        positive, negative = balance(low, high)
    while unbalanced(positive, negative) and high < maximum[1] - 1e-9:
        high = min(high + step, maximum[1])
        positive, negative = balance(low, high)
    return ClipBounds(low, high, positive, negative)
