"""Per-step gradient norms: how hard each denoising step pulls on the weights.

The update accumulates every trained step's gradient into one ``.grad`` before the optimizer
step, so the logged ``grad_norm`` mixes the steps. A hook on each trainable tensor sees the
gradient of one backward pass before it is added in, so the norm of step ``k``'s own gradient
costs one squared norm per tensor and no copy of the gradients. With micro-batches
(``train.micro_batch_size``) a step's gradient arrives in several backward passes; ``accumulate``
then sums them per tensor (one copy of the gradients) and takes the norm of the sum.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterable

import torch
from torch import Tensor


class StepGradNorms:
    """Measures the gradient norm of each ``backward()`` over ``parameters``.

    Use as a context manager around the update (the hooks are removed on exit); after each
    backward, :meth:`take` returns that backward's gradient norm (before clipping, and before
    any averaging over processes: this rank's rows only) and starts the next one. ``enabled``
    ``False`` (sharded weights, where FSDP writes the gradients outside autograd's hooks)
    measures nothing and :meth:`take` returns NaN. ``accumulate``: :meth:`take` returns the norm
    of the sum of the gradients of the backward passes since the last call, not of each one's.
    """

    def __init__(self, parameters: Iterable[Tensor], enabled: bool = True, accumulate: bool = False) -> None:
        self.parameters = [p for p in parameters if p.requires_grad] if enabled else []
        self.enabled = enabled
        self.accumulate = accumulate
        self.squared: Tensor | None = None
        self.sums: dict[int, Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def _add(self, grad: Tensor) -> None:
        # kept on the device: one synchronisation per take(), not one per tensor
        value = grad.detach().float().pow(2).sum()
        self.squared = value if self.squared is None else self.squared + value.to(self.squared.device)

    def _sum(self, index: int, grad: Tensor) -> None:
        # a copy: autograd may hand the same tensor on as .grad and add the next backward into it
        total = self.sums.get(index)
        if total is None:
            self.sums[index] = grad.detach().clone()
        else:
            total.add_(grad.detach())

    def __enter__(self) -> "StepGradNorms":
        if self.accumulate:
            self.handles = [p.register_hook(partial(self._sum, index)) for index, p in enumerate(self.parameters)]
        else:
            self.handles = [p.register_hook(self._add) for p in self.parameters]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def take(self) -> float:
        """The norm of the gradient of the backward passes since the last call (0 when none reached the weights):
        of each one's (their squares summed), or with ``accumulate`` of their sum."""
        if not self.enabled:
            return math.nan
        sums, self.sums = self.sums, {}
        for total in sums.values():
            self._add(total)
        squared, self.squared = self.squared, None
        return 0.0 if squared is None else float(squared.sqrt())
