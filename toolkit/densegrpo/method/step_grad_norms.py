"""Per-step gradient norms: how hard each denoising step pulls on the weights.

The update accumulates every trained step's gradient into one ``.grad`` before the optimizer
step, so the logged ``grad_norm`` mixes the steps. A hook on each trainable tensor sees the
gradient of one backward pass before it is added in, so the norm of step ``k``'s own gradient
costs one squared norm per tensor and no copy of the gradients.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor


class StepGradNorms:
    """Measures the gradient norm of each ``backward()`` over ``parameters``.

    Use as a context manager around the update (the hooks are removed on exit); after each
    backward, :meth:`take` returns that backward's gradient norm (before clipping, and before
    any averaging over processes: this rank's rows only) and starts the next one. ``enabled``
    ``False`` (sharded weights, where FSDP writes the gradients outside autograd's hooks)
    measures nothing and :meth:`take` returns NaN.
    """

    def __init__(self, parameters: Iterable[Tensor], enabled: bool = True) -> None:
        self.parameters = [p for p in parameters if p.requires_grad] if enabled else []
        self.enabled = enabled
        self.squared: Tensor | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def _add(self, grad: Tensor) -> None:
        # kept on the device: one synchronisation per take(), not one per tensor
        value = grad.detach().float().pow(2).sum()
        self.squared = value if self.squared is None else self.squared + value.to(self.squared.device)

    def __enter__(self) -> "StepGradNorms":
        self.handles = [p.register_hook(self._add) for p in self.parameters]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def take(self) -> float:
        """The norm of the gradient of the backward passes since the last call (0 when none reached the weights)."""
        if not self.enabled:
            return math.nan
        squared, self.squared = self.squared, None
        return 0.0 if squared is None else float(squared.sqrt())
