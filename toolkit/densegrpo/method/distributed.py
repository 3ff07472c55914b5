"""torch.distributed plumbing for the GRPO loop (torchrun / accelerate launch).

A single process needs no launcher: every function here is the identity when
``WORLD_SIZE`` is 1. With a launcher, the global batch of ``N`` samples is split into
``W`` contiguous, equal shards; rewards are all-gathered before advantages, so group
statistics always see every member of a group even when a group spans ranks. The
trainable module is handed to torch's own data-parallel engines (:class:`DataParallel`):
``DistributedDataParallel`` (``train.data_parallel: ddp``, the default) averages the
gradients over ranks once per optimizer step, and FSDP2's ``fully_shard``
(``train.data_parallel: fsdp``, for full fine-tuning) shards weights, gradients and
optimizer state; either way ``W`` processes step like one process on the same global batch.
Backends: NCCL on GPUs, gloo on CPU. Every collective of :class:`World` issues its tensor on a
device the backend serves (:meth:`World.collective_device`; NCCL serves CUDA only) and hands the
result back on the caller's device, so callers may pass CPU tensors under any backend.
"""

from __future__ import annotations

import gc
import inspect
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ContextManager, Iterator, Literal

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from densegrpo.contracts.errors import UserError
from densegrpo.contracts.sharding import full_tensor

DataParallelMode = Literal["ddp", "fsdp"]


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

    def split(self, total: int) -> slice:
        """This rank's contiguous share of ``total`` items that need not divide evenly (evaluation
        prompts): rank ``r`` owns ``[r * total // W, (r + 1) * total // W)``, so shares differ by at
        most one item, some may be empty, and together they are ``range(total)`` in rank order."""
        return slice(self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size)

    def collective_device(self, device: torch.device | None = None) -> torch.device:
        """The device a collective's tensor is issued on, for a tensor on ``device`` (``None``: a number).

        The CPU when ``device`` is the CPU and the backend serves it (gloo: no copy); the current
        device of ``device``'s type when the backend serves that type (a tensor on the rank's GPU is
        not copied; one on another GPU, e.g. a reward's, moves to the rank's, where NCCL's
        communicator lives); otherwise the CPU if served, else the current device of the first type
        the backend serves (NCCL: ``cuda``, the GPU ``init_world`` selected with
        ``torch.cuda.set_device``). An index-less device such as ``cuda`` means that type's
        current device wherever a tensor is made or moved.

        Chosen from what the backend declares it serves (``torch.distributed.get_backend_config()``,
        e.g. ``cuda:nccl`` or ``cpu:gloo,cuda:gloo``), not from its name, so any backend works.
        """
        served = served_device_types()
        if device is not None and device.type in served:
            return device if device.type == "cpu" else torch.device(device.type)
        return torch.device("cpu" if "cpu" in served else served[0])

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's equal-sized ``local (n, ...)`` along dim 0, in rank order: ``(W * n, ...)``.

        The tensor travels on :meth:`collective_device` (NCCL: the rank's GPU, so a CPU tensor makes
        one round trip of ``W * n`` rows) and comes back on ``local``'s device, in its dtype.
        """
        if not self.active:
            return local
        sent = local.to(self.collective_device(local.device)).contiguous()
        parts = [torch.empty_like(sent) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, sent)
        return torch.cat(parts, dim=0).to(local.device)

    def gather_split(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """Inverse of :meth:`split`: every rank's share ``local (n_r, ...)`` of ``total`` rows,
        concatenated in rank order ``(total, ...)``, on ``local``'s device and in its dtype.

        Shares may differ by one row (or be empty), which ``all_gather`` does not allow: each is
        padded to ``ceil(total / W)`` rows, gathered, and the padding dropped (every rank knows every
        share's size from ``total``, so no sizes are exchanged).
        """
        share = self.split(total)
        if local.shape[0] != share.stop - share.start:
            raise ValueError(f"rank {self.rank} holds {local.shape[0]} rows, but its share of {total} is {share.stop - share.start}")
        if not self.active:
            return local
        width = -(-total // self.world_size)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        gathered = self.gather(padded)
        sizes = [(r + 1) * total // self.world_size - r * total // self.world_size for r in range(self.world_size)]
        return torch.cat([gathered[r * width : r * width + size] for r, size in enumerate(sizes)], dim=0)

    def sum(self, value: float) -> float:
        """Sum a Python number over ranks (float64 on :meth:`collective_device`: integers exact below 2**53)."""
        return self._all_reduce(value, torch_dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        """The largest of a Python number over ranks."""
        return self._all_reduce(value, torch_dist.ReduceOp.MAX)

    def barrier(self) -> None:
        """Return once every rank has called it.

        An all-reduce of one number on :meth:`collective_device`, read back on the host, rather than
        ``torch.distributed.barrier()``: that one picks its device from the machine's accelerator
        (and warns, or guesses the GPU from the rank, unless a device was bound at init), not from
        what the backend serves; reading the result blocks the host as a barrier must.
        """
        self._all_reduce(0.0, torch_dist.ReduceOp.SUM)

    def _all_reduce(self, value: float, op: Any) -> float:
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.collective_device())
        torch_dist.all_reduce(tensor, op=op)
        return float(tensor.item())  # .item() waits for the result, also on a GPU stream


def served_device_types() -> tuple[str, ...]:
    """Device types (``"cpu"``, ``"cuda"``, ...) the default process group's backend serves, in the
    order it declares them: NCCL ``("cuda",)``, gloo ``("cpu", "cuda")``."""
    config = torch_dist.get_backend_config()  # "cuda:nccl", "cpu:gloo,cuda:gloo", ...
    served = tuple(pair.split(":", 1)[0].strip() for pair in config.split(",") if ":" in pair)
    if not served:
        raise RuntimeError(f"the process group's backend configuration '{config}' names no device type")
    return served


def launcher_rank() -> int:
    """This process's global rank as set by torchrun / accelerate launch (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def init_world(timeout_s: float) -> World:
    """Join the process group if a launcher started us (``WORLD_SIZE > 1``): NCCL where CUDA is
    available (each rank on GPU ``LOCAL_RANK``), gloo otherwise.

    ``timeout_s`` (``collective_timeout_s`` of the run config): how long a collective may wait for
    the other ranks before the job fails, instead of hanging for ever on a dead or stuck rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank = launcher_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return World(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown(world: World) -> None:
    """Destroy the process group, after freeing what still holds it.

    DDP/FSDP wrappers keep a reference to the process group; if one outlives
    ``destroy_process_group`` (a reference cycle not yet collected), gloo's worker threads are
    torn down at interpreter exit instead, which can abort the process
    ("terminate called without an active exception").
    """
    if world.active:
        gc.collect()
        torch_dist.destroy_process_group()


class DataParallel:
    """Hands a policy's trainable module to DDP or FSDP2 and drives gradient synchronisation.

    ``attach(policy)`` calls the policy's optional ``data_parallel(wrap)`` hook (see
    :class:`densegrpo.contracts.protocols.Policy`): the policy gives :meth:`wrap` a module whose
    ``forward(x, sigma, cond)`` computes the velocity from the trainable weights, and from then
    on runs its forward passes with gradients (FSDP: all of them) through the returned module.

    * ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` (``broadcast_buffers=False``;
      ``device_ids`` the module's GPU, none on CPU). Backward passes inside
      :meth:`gradient_sync` ``(False)`` accumulate locally (``no_sync``); the next backward
      averages the accumulated gradients over ranks, once per optimizer step.
    * ``fsdp``: FSDP2 ``fully_shard`` on every block of the module's first ``ModuleList``\\ s
      (e.g. ``transformer_blocks``, ``down_blocks``), then on the whole module: weights,
      gradients and optimizer state are sharded over ranks and gathered block by block for
      each forward, so every rank must run the same forward passes (rollouts, evaluation).
      Gradient accumulation uses ``set_requires_gradient_sync(False)``.

    With one process (``world.active`` false) nothing is wrapped and everything is the identity.
    """

    def __init__(self, world: World, mode: DataParallelMode = "ddp"):
        if mode not in ("ddp", "fsdp"):
            raise UserError(f"train.data_parallel '{mode}' is unknown; use 'ddp' or 'fsdp'")
        self.world = world
        self.mode = mode
        self.module: nn.Module | None = None

    @property
    def sharded(self) -> bool:
        """True when weights are sharded (FSDP): gathering them and every forward is collective."""
        return self.module is not None and self.mode == "fsdp"

    def attach(self, policy: Any) -> None:
        """Let ``policy`` route its trainable forward passes through :meth:`wrap` (no-op in one process)."""
        if not self.world.active:
            return
        hook = policy.data_parallel  # an optional Policy member: None when the policy trains in one process only
        if hook is None:
            raise UserError(
                f"policy {type(policy).__name__} cannot train on several processes: it has no data_parallel(wrap) "
                "method (see docs/policies.md); run it in one process"
            )
        hook(self.wrap)
        if self.module is None:
            raise UserError(f"policy {type(policy).__name__}.data_parallel() did not pass its trainable module to wrap()")

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP wrapper of ``module``, or ``module`` itself sharded in place by FSDP2."""
        if self.module is not None:
            raise RuntimeError("DataParallel wraps one module; the policy called wrap() twice")
        device = next(module.parameters()).device
        served = served_device_types()
        if device.type not in served:
            # DDP's first broadcast would fail with "No backend type associated with device type ..."
            raise UserError(
                f"the policy's trainable weights are on {device.type}, but the process group's backend "
                f"({torch_dist.get_backend()}) serves {', '.join(served)} only; put the policy there "
                f"(--set device={served[0]})"
            )
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
            # Buffers are not synchronised on forward (torch 2.14 renamed broadcast_buffers to forward_sync_buffers).
            renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            buffers = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
            self.module = DistributedDataParallel(module, device_ids=ids, **buffers)
        else:
            from torch.distributed.device_mesh import init_device_mesh

            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:
                raise UserError(f"train.data_parallel: fsdp needs FSDP2 (torch >= 2.6, this is {torch.__version__}); use ddp") from None
            mesh = init_device_mesh(device.type, (self.world.world_size,))
            for block in _blocks(module):
                fully_shard(block, mesh=mesh)
            self.module = fully_shard(module, mesh=mesh)
        return self.module

    def gradient_sync(self, enabled: bool) -> ContextManager[None]:
        """Context for one forward+backward: reduce gradients over ranks only if ``enabled``.

        Use ``gradient_sync(False)`` for all but the last backward before an optimizer step.
        """
        if not self.world.active:
            return nullcontext()
        if self.module is None:
            raise RuntimeError("attach the policy to DataParallel before training on several processes")
        if enabled:
            return nullcontext()
        if self.mode == "ddp":
            return self.module.no_sync()  # type: ignore[operator]
        return self._fsdp_no_sync()

    @contextmanager
    def _fsdp_no_sync(self) -> Iterator[None]:
        self.module.set_requires_gradient_sync(False)  # type: ignore[union-attr]
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)  # type: ignore[union-attr]

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with sharded (FSDP) states gathered to full tensors.

        The format is the single-process one, so a checkpoint resumes with any number of
        processes and either mode. Collective under FSDP: call it on every rank.
        """
        state = optimizer.state_dict()
        if not self.sharded:
            return state
        full = {index: {key: full_tensor(value) for key, value in entry.items()} for index, entry in sorted(state["state"].items())}
        return {"state": full, "param_groups": state["param_groups"]}

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Inverse of :meth:`optimizer_state_dict`: full states are sharded like their parameters."""
        optimizer.load_state_dict(state)
        if not self.sharded:
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        for group in optimizer.param_groups:
            for param in group["params"]:
                if not isinstance(param, DTensor):
                    continue
                entry = optimizer.state.get(param, {})
                for key, value in entry.items():
                    if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                        entry[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    """Elements of the outermost ``ModuleList``\\ s under ``module`` (a model's repeated blocks)."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from child
        else:
            yield from _blocks(child)

