"""GRPO-Guard's RatioNorm: the per-step importance ratio, centred and rescaled (method.md section 2).

Wang et al., "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated
Clipping", arXiv 2510.22319, section 3 (RatioNorm). The formula is read from the authors' code in
Flow-GRPO's repository, ``scripts/train_sd3_GRPO_Guard.py`` lines 915-919 (the fork
zhtmike/flow_grpo at 9745241, which carries the upstream file):

    sigma_t         = std_dev_t.mean()                                     # Flow-GRPO's std_t
    ratio_mean_bias = (prev_sample_mean - old_prev_sample_mean)^2 .mean(C, h, w)
                      / (2 (sqrt_dt.mean() * sigma_t)^2)
    ratio           = exp((log_prob - old_log_prob + ratio_mean_bias) * (sqrt_dt.mean() * sigma_t))

``sqrt_dt * sigma_t`` is the transition std ``s = step_std`` of the step (method.md section 1). Why
(the paper's argument, checked here in closed form): the rollout drew ``x' = mu_old + s eps``; for
a Gaussian step of per-dimension-mean log-density (as every built-in sampler's ``log_probs``),

    log r = log p_theta(x') - log p_old(x') = (2 s <eps, dmu> - <dmu, dmu>) / (2 s^2),
    dmu   = mu_theta - mu_old,  <a, b> = mean over C*h*w of a * b,

so under the old policy ``E[log r] = -<dmu, dmu> / (2 s^2) < 0`` (the left-shifted ratio that lets
positive-advantage samples escape the clip) and ``std[log r]`` grows as ``1 / s`` (the late, low
noise steps have the widest ratios). RatioNorm removes the mean analytically, not from batch
statistics, and multiplies by ``s``:

    log r_norm = s (log r - E_old[log r]) = <eps, dmu>

whose mean is 0 and whose spread no longer depends on the step's noise. The bias keeps its
gradient (``prev_sample_mean`` carries it in the reference code). ``E_old[log r]`` is the
sampler's :attr:`~densegrpo.contracts.protocols.Sampler.expected_log_ratio`: :func:`gaussian_expected_log_ratio`
(:mod:`densegrpo.contracts.protocols`, the default of the optional member)
for isotropic noise, the subspace form for coarse-sde.
"""

from __future__ import annotations

from torch import Tensor

from densegrpo.contracts.protocols import gaussian_expected_log_ratio


def normalized_log_ratio(log_ratio: Tensor, expected_log_ratio: Tensor, step_std: float) -> Tensor:
    """RatioNorm: ``s (log r - E_old[log r])``; ``log_ratio, expected_log_ratio (N,)`` -> ``(N,)``.

    ``exp`` of it is the ratio GRPO-Guard clips (train_sd3_GRPO_Guard.py line 919)."""
    return (log_ratio - expected_log_ratio) * step_std


__all__ = ["gaussian_expected_log_ratio", "normalized_log_ratio"]
