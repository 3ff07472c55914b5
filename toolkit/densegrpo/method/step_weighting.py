"""Per-step weights of the policy loss (``train.step_weighting``; method.md section 2).

The loop multiplies the clipped surrogate of step ``k`` by ``w_k`` (the KL term keeps weight 1,
as in both references). Three forms:

``none``
    ``w_k = 1``: Flow-GRPO and DenseGRPO, every trained step counts the same.

``grpo-guard``
    ``w_k = 1 / (-dt_k) = 1 / (sigma_k - sigma_{k+1})``: GRPO-Guard's gradient reweighting
    (Wang et al., arXiv 2510.22319, section 3). Read from the authors' code,
    ``scripts/train_sd3_GRPO_Guard.py`` lines 931-932 of Flow-GRPO's repository (the fork
    zhtmike/flow_grpo at 9745241): ``policy_loss = policy_loss / (sqrt_dt.mean()**2)``. With
    RatioNorm the gradient of the log-ratio through the mean is ``eps``, and the mean moves by
    ``O(dt) * dv``, so a step's gradient is proportional to ``-dt``; dividing by it equalises the
    steps. It is meant to go with ``train.ratio_norm`` (the paper's method is both), but is a
    separate switch, as the paper's ablation treats them.

``tempflow``
    ``w_k = s_k / mean_{j trained}(s_j)`` with ``s_k = step_std_k = std_t sqrt(-dt)``, the
    transition std: TempFlow-GRPO's noise-aware policy weighting (He et al., arXiv 2508.04324,
    section 3, "noise-aware weighting"; its Eq. 8, ``Norm(sigma_t sqrt(dt))``, is quoted from a
    third-party implementation, TeleBoost's noise-weighting module; the paper itself was not read).
    The authors' code (Shredded-Pork/TempFlow-GRPO at e66824e) multiplies both PPO terms by
    ``2.25 * std_dev_t`` (scripts/train_sd3_pr.py, ``unclipped_loss = - 2.25 * std_dev_t *
    advantages * ratio``), where its ``sde_step_with_logprob`` returns ``std_dev_t *
    torch.sqrt(-1*dt)``, the transition std (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py,
    the return line, about line 81; its comment calls this "the original paper's case"). This
    toolkit normalises to mean 1 over the trained steps in place of the hand-tuned 2.25, so the
    loss keeps its scale and only the balance between steps changes: high-noise early steps,
    where a change moves the image most, weigh more than the late refinement steps.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

StepWeighting = Literal["none", "grpo-guard", "tempflow"]
"""The forms of ``train.step_weighting``."""


def step_weights(sigmas: Tensor, step_std: Tensor, trained: Tensor, form: StepWeighting) -> Tensor:
    """``(T,)`` float32 weight ``w_k`` of each step's policy loss.

    Args:
        sigmas: ``(T+1,)`` the grid, from 1 to 0.
        step_std: ``(T,)`` the transition std of each step (``Trajectory.step_std``).
        trained: ``(T,)`` bool, the steps that enter the loss (tempflow normalises over them).
        form: see the module docstring.
    """
    sigmas, step_std = sigmas.detach().float().cpu(), step_std.detach().float().cpu()
    if form == "none":
        return torch.ones_like(step_std)
    if form == "grpo-guard":
        return 1.0 / (sigmas[:-1] - sigmas[1:])  # the grid decreases strictly: -dt > 0
    if form == "tempflow":
        trained = trained.detach().cpu().bool()
        if not bool(trained.any()):
            return torch.ones_like(step_std)
        return step_std / step_std[trained].mean()
    raise ValueError(f"unknown step weighting '{form}'; use one of none, grpo-guard, tempflow")


__all__ = ["StepWeighting", "step_weights"]
