"""What BAPO computes across processes, on top of accelerate: every process holds the gathered rollout and takes
the same decisions, so these keep their views and draws alike."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast


def local_share(accelerator: Accelerator, rows: list) -> list:
    """This process's contiguous share of a list that every process holds, as TRL's sampler splits it."""
    share = len(rows) // accelerator.num_processes
    return rows[accelerator.process_index * share : (accelerator.process_index + 1) * share]


def local_rows(accelerator: Accelerator, rows: torch.Tensor, local_count: int) -> torch.Tensor:
    """The rows, given in gathered numbering, that this process holds, in its own numbering."""
    first = accelerator.process_index * local_count
    return rows[(rows >= first) & (rows < first + local_count)] - first


def shared_permutation(accelerator: Accelerator, count: int) -> torch.Tensor:
    """A random order of `count` rows, process 0's on every process: TRL's shuffle draws from the global RNG, which
    drifts apart across processes during generation, and all must cut the batch the same way."""
    permutation = torch.randperm(count).to(accelerator.device)
    if accelerator.num_processes > 1:
        permutation = broadcast(permutation, from_process=0)
    return permutation.cpu()


def sum_processes(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(values, reduction="sum") if accelerator.num_processes > 1 else values


def gathered_mean(accelerator: Accelerator, values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` over the masked tokens of every process, as TRL logs its loss metrics."""
    totals = sum_processes(accelerator, torch.stack([(values.detach() * mask).sum(), mask.sum()]))
    return (totals[0] / totals[1].clamp(min=1.0)).item()
