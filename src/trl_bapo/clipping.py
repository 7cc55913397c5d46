"""Adaptive clipping of Balanced Policy Optimization (arXiv 2510.18927), a loss option beside TRL's clipped losses:
ratio bounds chosen per micro-batch so that positive-advantage tokens are not outweighed by negative ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from trl_bapo.batch import loss_mask
from trl_bapo.behavior import BEHAVIOR_LOGPS, after_forward
from trl_bapo.correction import weighted_advantages
from trl_bapo.distributed import sum_processes


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


@contextmanager
def adaptive_clipping(trainer, inputs: dict[str, Any]) -> Iterator[None]:
    """Runs TRL's loss with bounds chosen for this micro-batch. TRL's loss (trl 1.16.0) takes the current log-probs
    from one forward pass and then reads `epsilon_low` / `epsilon_high`: the bounds are chosen right after that
    forward, from its ratios, and the dual clip goes through TRL's `delta`."""
    args, bounds = trainer.args, (trainer.epsilon_low, trainer.epsilon_high)

    def choose(logps: torch.Tensor) -> None:
        old = inputs.get(BEHAVIOR_LOGPS, logps.detach())
        chosen = adaptive_clip_bounds(
            torch.exp(logps.detach() - old),
            weighted_advantages(inputs, 1.0)["advantages"],  # per row, or per token when weighted
            loss_mask(inputs),
            start=tuple(args.adaptive_clip_start),
            step=args.adaptive_clip_step,
            maximum=tuple(args.adaptive_clip_max),
            target=args.adaptive_clip_target,
            all_reduce=partial(sum_processes, trainer.accelerator),
        )
        trainer.epsilon_low, trainer.epsilon_high = 1 - chosen.low, chosen.high - 1
        trainer._log_step(clip_low=chosen.low, clip_high=chosen.high)
        trainer._log_step(clip_positive=chosen.positive, clip_negative=chosen.negative)

    args.delta = args.adaptive_clip_dual
    try:
        with after_forward(trainer, choose):
            yield
    finally:
        (trainer.epsilon_low, trainer.epsilon_high), args.delta = bounds, None
