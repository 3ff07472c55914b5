"""Tiny random-weight models built in code, for offline tests of the aesthetic reward."""

from __future__ import annotations

from typing import Any

import torch


def tiny_clip_vision(seed: int = 0, image_size: int = 30) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPImageProcessor)`` with random weights and a 768-d projection (as CLIP-L/14)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=6),
        projection_dim=768,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return model, processor


def tiny_mlp(seed: int = 0) -> Any:
    """The real :class:`AestheticMLP` architecture with random weights."""
    from densegrpo_aesthetic.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    return AestheticMLP().eval()


def tiny_aesthetic(**config: Any) -> Any:
    """An :class:`~densegrpo_aesthetic.aesthetic.AestheticReward` on tiny random weights (CPU)."""
    from densegrpo_aesthetic.aesthetic import AestheticReward

    model, processor = tiny_clip_vision()
    return AestheticReward.from_modules(model, processor, tiny_mlp(), AestheticReward.Config(device="cpu", **config))
