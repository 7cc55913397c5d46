"""What `beta` weighs in BAPOTrainer, decided here and nowhere else.

With `kl_reference: ref` beta weighs KL(pi || pi_ref) against TRL's reference model, as in GRPOTrainer. With
`kl_reference: behavior` (the paper's eq. 3) it weighs KL(pi || pi_behavior), the policy that generated each row: the
row's behavior log-probs stand where TRL keeps the reference's (`ref_per_token_logps`), so TRL's k3 estimate, and
that of BAPO's own losses, measure the KL to the behavior policy, and no reference model is built or scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

REFERENCE_LOGPS = "ref_per_token_logps"


def behavior_kl(args) -> bool:
    """Whether beta weighs the KL to the behavior policy (and a non-zero one)."""
    return args.kl_reference == "behavior" and args.beta != 0.0


@contextmanager
def no_reference_model(args) -> Iterator[None]:
    """Around GRPOTrainer's constructor: with the behavior KL, TRL must not build a reference model (it builds one
    whenever beta != 0), since the KL never reads it."""
    beta = args.beta
    if behavior_kl(args):
        args.beta = 0.0
    try:
        yield
    finally:
        args.beta = beta


@contextmanager
def reference_kl_off(trainer) -> Iterator[None]:
    """Around TRL's scoring: with the behavior KL there is no reference model, which TRL would score while
    beta != 0."""
    beta = trainer.beta
    if behavior_kl(trainer.args):
        trainer.beta = 0.0
    try:
        yield
    finally:
        trainer.beta = beta


def set_kl_reference(trainer, chunk: dict[str, Any], behavior: torch.Tensor) -> None:
    """With the behavior KL, a micro-batch's behavior log-probs are what the KL term measures against."""
    if behavior_kl(trainer.args):
        chunk[REFERENCE_LOGPS] = behavior
