"""The loss types trl-bapo trains with, in one table, and its own losses for stale data.

`LOSSES` holds every loss type `loss_type` may name: TRL's own (TRL computes them) and the off-policy group-relative
REINFORCE losses of arXiv 2509.24203 ("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm"), which
trl-bapo computes: the REC family (clipping as regularisation), AsymRE (an optimistic baseline shift) and OPMD
(online policy mirror descent: a squared log-ratio to the behavior policy). Config validation, the cutting of
micro-batches and the trainer all read it. To add a loss, write its per-token function and give it an entry:

    def my_loss(logps, old_logps, advantages, args):
        return -advantages * logps

    LOSSES["my_loss"] = Loss("token", per_token=my_loss)

Notation (every tensor is (batch, tokens)): `logps` are the current policy's per-token log-probs (they carry the
gradient), `old_logps` the behavior policy's, `advantages` one value per completion broadcast over its tokens.
A per-token function returns the loss to minimise; `own_loss` averages it over the micro-batch's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trl_bapo.batch import loss_mask
from trl_bapo.behavior import BEHAVIOR_LOGPS, forward_logps
from trl_bapo.correction import IMPORTANCE_WEIGHT
from trl_bapo.distributed import gathered_mean
from trl_bapo.kl import REFERENCE_LOGPS

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


def _rec(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, args) -> torch.Tensor:
    high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    return rec_loss(
        logps,
        old_logps,
        advantages,
        args.rec_variant,
        args.epsilon,
        high,
        args.rec_ring_epsilon_low,
        args.rec_ring_epsilon_high,
    )


@dataclass(frozen=True)
class Loss:
    """A loss type: how it normalises a micro-batch ('sequence': the mean over rows of each row's token mean;
    'token': the mean over the micro-batch's tokens; 'global': tokens summed and divided by the whole batch's, which
    TRL counts itself), whether it is a clipped surrogate of a token-level ratio (which adaptive clipping sets
    bounds for), and the per-token function of a loss trl-bapo computes itself (None: TRL computes it)."""

    normalisation: str
    clipped: bool = False
    per_token: Callable[..., torch.Tensor] | None = None


LOSSES: dict[str, Loss] = {
    # TRL's, as trl 1.16.0 normalises them (GRPOTrainer._compute_loss); TRL checks the names only at the first step.
    "grpo": Loss("sequence", clipped=True),
    "dr_grpo": Loss("sequence", clipped=True),
    "bnpo": Loss("token", clipped=True),
    "dapo": Loss("global", clipped=True),
    "cispo": Loss("global"),
    "sapo": Loss("sequence"),
    "luspo": Loss("sequence"),
    "vespo": Loss("global"),
    # trl-bapo's, for stale data
    "rec": Loss("token", per_token=_rec),
    "asymre": Loss(
        "token", per_token=lambda logps, old, advantages, args: asymre_loss(logps, advantages, args.asymre_tau)
    ),
    "opmd": Loss(
        "token", per_token=lambda logps, old, advantages, args: opmd_loss(logps, old, advantages, args.opmd_tau)
    ),
}


def own_loss(trainer, model, inputs: dict[str, Any]) -> torch.Tensor:
    """A loss trl-bapo computes itself, on a micro-batch: the mean per-token loss over its tokens, weighed by TRL's
    vLLM importance weight and the decoupled correction's when present, plus TRL's KL term (bias-corrected as
    `use_bias_correction_kl` says), entropy bonus and a Mixture-of-Experts model's load-balancing loss, each as
    TRL adds them to its own losses (trl 1.16.0). Entropy and KL are logged as means over every process's tokens."""
    args, mode = trainer.args, "train" if model.training else "eval"
    mask = loss_mask(inputs)
    logps, entropies, aux_loss = forward_logps(trainer, model, inputs, with_grad=True)
    old = inputs.get(BEHAVIOR_LOGPS, logps.detach())
    per_token = LOSSES[trainer.loss_type].per_token(logps, old, inputs["advantages"].unsqueeze(1), args)
    for weight in ("importance_sampling_ratio", IMPORTANCE_WEIGHT):
        if weight in inputs:
            per_token = per_token * inputs[weight]
    if trainer.beta != 0.0:  # TRL's k3 estimate of KL(pi || ref), the reference as `trl_bapo.kl` says
        log_ratio = inputs[REFERENCE_LOGPS] - logps
        kl = torch.exp(log_ratio) - log_ratio - 1
        if args.use_bias_correction_kl:  # weighed by the ratio to the behavior policy, as TRL does
            kl = kl * torch.exp(logps - old)
        per_token = per_token + trainer.beta * kl
        trainer._metrics[mode]["kl"].append(gathered_mean(trainer.accelerator, kl, mask))
    tokens = mask.sum().clamp(min=1.0)
    loss = (per_token * mask).sum() / tokens - trainer.entropy_coef * (entropies * mask).sum() / tokens
    trainer._metrics[mode]["entropy"].append(gathered_mean(trainer.accelerator, entropies, mask))
    if trainer.aux_loss_enabled:
        loss = loss + trainer.router_aux_loss_coef * aux_loss
        trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux_loss).mean().item())
    return loss / (trainer.current_gradient_accumulation_steps if mode == "train" else 1.0)
