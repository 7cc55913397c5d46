"""What BAPO touches of the engine that holds the parameters: DDP, FSDP2 or DeepSpeed ZeRO-1/2/3.

The delayed rollout policy is kept as each process's own share of the trainable parameters: the whole tensor under
DDP and ZeRO-1/2, the local shard of the DTensor under FSDP2, the partition `ds_tensor` under ZeRO-3. Swapping
those shares in place swaps the policy the next forward computes with, provided no full copy gathered from them is
still registered: `release_gathered` drops such copies with each engine's own call (FSDP2's `reshard()`, ZeRO-3's
`partition()`), so the next forward gathers them again from the swapped shards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def local_shard(param: nn.Parameter) -> torch.Tensor:
    """The values of `param` that this process holds, as a tensor that writes through to the parameter."""
    if hasattr(param, "ds_tensor"):  # DeepSpeed ZeRO-3
        return param.ds_tensor.data
    if isinstance(param, DTensor):  # FSDP2
        return param.to_local()
    return param.data


def check_swappable(model: nn.Module) -> None:
    """Fails clearly where a process's shares do not determine what the forward computes."""
    for name, param in trainable_parameters(model).items():
        if getattr(param, "ds_secondary_tensor", None) is not None:
            raise NotImplementedError(
                f"Parameter {name} has a ZeRO++ secondary partition (zero_hpz_partition_size > 1), which the delayed "
                "rollout policy cannot swap. Set zero_hpz_partition_size to 1, or rollout_delay=1."
            )
        if hasattr(param, "ds_tensor") and getattr(param.ds_tensor, "final_location", None) == "nvme":
            raise NotImplementedError(
                f"Parameter {name} is offloaded to NVMe, where the delayed rollout policy cannot swap it. Offload "
                "parameters to cpu or none, or set rollout_delay=1."
            )


def release_gathered(model: nn.Module) -> None:
    """Drops full parameter copies gathered from shards (FSDP2 keeps the root's after a no-grad forward, ZeRO-3
    keeps its persistent parameters), so the next forward gathers them from the shards again. Local only: no
    collective runs here."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    gathered = [
        param for param in model.parameters() if hasattr(param, "ds_tensor") and param.ds_status.name == "AVAILABLE"
    ]
    if gathered:
        gathered[0].partition(param_list=gathered)


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` in CPU memory, pinned when a GPU is there so copies back and forth go fast."""
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
    return copy.copy_(tensor.detach())
