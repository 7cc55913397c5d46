"""Batch selection rules of Algorithm 1, as functions of group rewards.

A rollout batch holds `num_groups * G` rewards, the G completions of a prompt next to each other. Group
accuracy mu(x) is the mean of the group's rewards (the paper's rewards are 0/1); rewards that are NaN
(every reward function returned None for that completion, as TRL marks them) are left out of the mean.
"""

from __future__ import annotations

import math

import torch

# Accuracies are k/G fractions; the tolerance keeps a threshold such as 1/8 inclusive despite rounding.
EPS = 1e-6


def correct_completions(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 where a completion's deciding reward reaches `threshold`, else 0; NaN (unscorable) stays NaN."""
    return torch.where(torch.isnan(rewards), rewards, (rewards >= threshold).float())


def group_accuracy(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """mu(x) per group: shape (num_groups,), NaN for a group with no scorable completion."""
    return torch.nanmean(rewards.view(-1, num_generations), dim=1)


def group_has_variance(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """True where a group's scorable rewards are not all equal, i.e. its advantages are not all zero."""
    grouped = rewards.view(-1, num_generations)
    high = torch.where(torch.isnan(grouped), -math.inf, grouped).max(dim=1).values
    low = torch.where(torch.isnan(grouped), math.inf, grouped).min(dim=1).values
    return (high - low) > EPS


def adaptive_threshold(r_tot: float, value_range: tuple[float, float]) -> float:
    """Eq. 8: c = r_tot * (c_high - c_low) + c_low, with r_tot the global average training reward."""
    low, high = value_range
    return min(max(r_tot, 0.0), 1.0) * (high - low) + low


def online_filter_mask(
    accuracy: torch.Tensor,
    has_variance: torch.Tensor,
    mode: str,
    generator: torch.Generator,
    gaussian_mean: float = 0.5,
    gaussian_std: float = 0.2,
    uniform_keep: float = 0.6,
) -> torch.Tensor:
    """X1: which fresh groups to train on (section 3.2 and appendix A.3).

    'range' keeps the groups with non-zero reward variance, on any reward scale: with 0/1 rewards exactly the
    paper's 1/G <= mu <= (G-1)/G, and with graded rewards (a length reward, a reward model, a format bonus beside
    an accuracy) every group whose advantages are not all zero, as GRPO learns from them. 'gaussian' keeps a group
    with probability exp(-(mu - mean)^2 / (2 std^2)) of its accuracy, and a group without one (no correctness signal)
    by its variance; 'uniform' keeps each group with probability `uniform_keep`.
    """
    if mode == "none":
        return torch.ones_like(has_variance)
    if mode == "range":
        return has_variance.clone()
    draws = torch.rand(accuracy.shape, generator=generator)
    if mode == "gaussian":
        keep_probability = torch.exp(-((accuracy - gaussian_mean) ** 2) / (2 * gaussian_std**2))
        return torch.where(torch.isnan(accuracy), has_variance, draws < keep_probability)
    if mode == "uniform":
        return draws < uniform_keep
    raise ValueError(f"Unknown online filter {mode!r}.")


def difficult_mask(accuracy: torch.Tensor, c1: float) -> torch.Tensor:
    """Groups whose prompt enters B_bad: mu <= c1 (Algorithm 1, line 8)."""
    return accuracy <= c1 + EPS


def high_quality_mask(accuracy: torch.Tensor, c2: float, c3: float) -> torch.Tensor:
    """Groups that enter B_high and may be drawn into X3: c2 <= mu <= c3 (lines 9 and 16)."""
    return (accuracy >= c2 - EPS) & (accuracy <= c3 + EPS)


def improved_mask(accuracy: torch.Tensor, c1: float) -> torch.Tensor:
    """Re-evaluated difficult prompts that join X2: c1 < mu < 1 (eq. 6)."""
    return (accuracy > c1 + EPS) & (accuracy < 1 - EPS)


def beats_mask(accuracy: torch.Tensor, entered_with: torch.Tensor) -> torch.Tensor:
    """Re-evaluated difficult prompts whose new mu beats the one they entered B_bad with (the authors' test)."""
    return accuracy > entered_with + EPS


def reevaluation_admitted(accuracy: torch.Tensor, entered_with: torch.Tensor, c1: float, rule: str) -> torch.Tensor:
    """Which re-evaluated prompts join X2 (`difficult_admission`): 'paper', eq. 6's c1 < mu < 1; 'improved', a mu
    that beats the entry accuracy and stays below 1; 'improved_or_solved', one that beats it, as the authors'
    code admits it (their eq. 6 test is commented out)."""
    if rule == "paper":
        return improved_mask(accuracy, c1)
    if rule == "improved":
        return beats_mask(accuracy, entered_with) & (accuracy < 1 - EPS)
    if rule == "improved_or_solved":
        return beats_mask(accuracy, entered_with)
    raise ValueError(f"Unknown difficult_admission {rule!r}.")


def x3_room(batch_groups: int, num_x1: int, num_x2: int) -> int:
    """Free room for X3 (eq. 7): B - |X1| - |X2|, never negative."""
    return max(0, batch_groups - num_x1 - num_x2)


def group_rows(group_indices: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Row indices of the given groups, each group's G rows in order."""
    offsets = torch.arange(num_generations, device=group_indices.device)
    return (group_indices.unsqueeze(1) * num_generations + offsets).reshape(-1)
