"""Tiny random detector and CLIP of the real architectures, built offline (tests, contract)."""

from __future__ import annotations

from typing import Any

import torch

from densegrpo_geneval.classes import GENEVAL_CLASSES


def tiny_mask2former(seed: int = 0, image_size: int = 64, num_queries: int = 8) -> tuple[Any, Any]:
    """A random ``Mask2FormerForUniversalSegmentation`` (tiny Swin backbone, 80 COCO labels) and its processor."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(
        image_size=image_size,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        encoder_feedforward_dim=32,
        num_queries=num_queries,
        num_labels=len(GENEVAL_CLASSES),
        id2label=dict(enumerate(GENEVAL_CLASSES)),
        label2id={name: i for i, name in enumerate(GENEVAL_CLASSES)},
    )
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    processor = Mask2FormerImageProcessor(size={"height": image_size, "width": image_size})
    return model, processor


def tiny_open_clip(seed: int = 0, image_size: int = 32) -> tuple[Any, Any, Any]:
    """A random ``open_clip.CLIP`` (1-layer ViT and text tower), its eval transform and CLIP's BPE tokenizer."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": image_size, "patch_size": 8, "layers": 1, "width": 32, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    ).eval()
    preprocess = open_clip.image_transform(image_size, is_train=False)
    return model, preprocess, open_clip.tokenizer.SimpleTokenizer()
