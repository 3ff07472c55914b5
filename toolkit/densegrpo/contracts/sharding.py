"""Plain or sharded parameters alike: what a policy's ``lora_state``/``load_lora_state`` need under
FSDP2, where each parameter is a ``DTensor`` holding one rank's shard."""

from __future__ import annotations

import torch
from torch import Tensor


def full_tensor(value: Tensor) -> Tensor:
    """The whole tensor behind a sharded ``DTensor`` (collective), or ``value`` itself."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def copy_into(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` for a plain or sharded (``DTensor``) parameter; ``value`` is the full tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(param.device, param.dtype)
    with torch.no_grad():
        if isinstance(param, DTensor):
            param.copy_(distribute_tensor(value, param.device_mesh, param.placements))
        else:
            param.copy_(value)
