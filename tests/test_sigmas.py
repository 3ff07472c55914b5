"""The sigma grid: SD3's shifted flow-matching schedule, checked against its closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from densegrpo.method.sigmas import make_sigmas


def closed_form(num_steps: int, shift: float) -> np.ndarray:
    """SD3's grid written out (float64): shifted linspace from 1 to the shifted 1/1000, then 0."""

    def shifted(u):
        return shift * u / (1.0 + (shift - 1.0) * u)

    sigma_min = shifted(1.0 / 1000.0)  # smallest sigma of the 1000-step training grid
    u = np.linspace(1.0, sigma_min, num_steps)  # set_timesteps spaces the *shifted* range...
    return np.append(shifted(u), 0.0)  # ...and shifts it again, exactly as diffusers does


@pytest.mark.parametrize("num_steps", [1, 2, 10, 40, 200])
@pytest.mark.parametrize("shift", [1.0, 3.0, 2.7])
def test_grid_matches_closed_form(num_steps: int, shift: float) -> None:
    sigmas = make_sigmas(num_steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,)
    np.testing.assert_allclose(sigmas.double().numpy(), closed_form(num_steps, shift), atol=1e-6)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_sd3_training_grid_values() -> None:
    # T = 10, shift 3: the grid Flow-GRPO / DenseGRPO train on (values of the closed form).
    expected = [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
    np.testing.assert_allclose(make_sigmas(10).numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("num_steps, shift", [(0, 3.0), (-1, 3.0), (10, 0.0), (2.5, 3.0)])
def test_bad_arguments_raise_value_error(num_steps, shift) -> None:
    with pytest.raises(ValueError):
        make_sigmas(num_steps, shift)
