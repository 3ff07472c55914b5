"""Tiny random-weight HPS models built in code, for offline tests (no hub access).

The tiny architecture ``densegrpo-tiny-hps`` (shipped as a 200-byte open_clip config) is
hpsv2's ViT-H-14 family shrunk: 2-layer towers of width 32, 32x32 input, the real
77-token context and 49408-token vocabulary so hpsv2's own tokenizer applies.
"""

from __future__ import annotations

from typing import Any

import torch

from densegrpo_hps._hps import TINY_ARCHITECTURE, create_model


def tiny_hps_model(seed: int = 0) -> Any:
    """hpsv2's open_clip ``CLIP`` of the tiny architecture with random weights."""
    torch.manual_seed(seed)
    return create_model(TINY_ARCHITECTURE).eval()


def tiny_hps(reward_class: Any, seed: int = 0, **config: Any) -> Any:
    """An HPS reward of ``reward_class`` on a tiny random model (CPU)."""
    cfg = reward_class.Config(architecture=TINY_ARCHITECTURE, device="cpu", **config)
    return reward_class.from_modules(tiny_hps_model(seed), cfg)


def tiny_hpsv2(**config: Any) -> Any:
    """An :class:`~densegrpo_hps.hpsv2.HPSv2Reward` on a tiny random model (CPU)."""
    from densegrpo_hps.hpsv2 import HPSv2Reward

    return tiny_hps(HPSv2Reward, 0, **config)


def tiny_hpsv21(**config: Any) -> Any:
    """An :class:`~densegrpo_hps.hpsv21.HPSv21Reward` on a tiny random model (CPU)."""
    from densegrpo_hps.hpsv21 import HPSv21Reward

    return tiny_hps(HPSv21Reward, 1, **config)
