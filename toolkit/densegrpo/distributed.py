"""torch.distributed plumbing for the GRPO loop (torchrun / accelerate launch).

A single process needs no launcher: every function here is the identity when
``WORLD_SIZE`` is 1. With a launcher, the global batch of ``N`` samples is split into
``W`` contiguous, equal shards; rewards are all-gathered before advantages, so group
statistics always see every member of a group even when a group spans ranks; gradients
are averaged with ``all_reduce`` (what DDP does), so ``W`` processes step exactly like one
process on the same global batch. Backends: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from densegrpo.errors import UserError


@dataclass
class World:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized()

    def shard(self, total: int) -> slice:
        """Rows of a global batch of ``total`` samples that this rank owns."""
        if total % self.world_size:
            raise UserError(
                f"the global batch of {total} samples does not split evenly over {self.world_size} processes; "
                "choose train.group_size * train.groups_per_iteration divisible by the number of processes"
            )
        size = total // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's equal-sized ``local`` along dim 0, in rank order."""
        if not self.active:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=0)

    def sum(self, value: float) -> float:
        """Sum a Python number over ranks."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        torch_dist.all_reduce(tensor)
        return float(tensor.item())

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Average ``.grad`` over ranks (coalesced all-reduce, as DDP does)."""
        if not self.active:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch_dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def _comm_device(self) -> torch.device:
        if torch_dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def init_world(timeout_s: float = 600.0) -> World:
    """Join the process group if a launcher started us (``WORLD_SIZE > 1``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return World(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown(world: World) -> None:
    if world.active:
        torch_dist.destroy_process_group()
