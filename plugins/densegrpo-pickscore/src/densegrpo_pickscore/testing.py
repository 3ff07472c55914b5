"""Tiny random-weight CLIP models built in code, for offline tests (no hub access).

``tiny_clip()`` returns a transformers ``CLIPModel`` and ``CLIPProcessor`` of the same
architecture family as PickScore/CLIP-L, small enough to run in milliseconds on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch


def tiny_tokenizer() -> Any:
    """A byte-level CLIP tokenizer: every byte (with and without ``</w>``), no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # highest id, as in CLIP's vocabulary
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(
    seed: int = 0, image_size: int = 30, projection_dim: int = 16, logit_scale: float = 2.6592
) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` with random weights; ``image_size`` is the processor's crop."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=6,
    )
    config = CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=projection_dim, logit_scale_init_value=logit_scale
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_pickscore(**config: Any) -> Any:
    """A :class:`~densegrpo_pickscore.pickscore.PickScoreReward` on a tiny random CLIP (CPU)."""
    from densegrpo_pickscore.pickscore import PickScoreReward

    model, processor = tiny_clip()
    return PickScoreReward.from_modules(model, processor, PickScoreReward.Config(device="cpu", **config))


def tiny_clipscore(**config: Any) -> Any:
    """A :class:`~densegrpo_pickscore.clipscore.CLIPScoreReward` on a tiny random CLIP (CPU)."""
    from densegrpo_pickscore.clipscore import CLIPScoreReward

    model, processor = tiny_clip(seed=1)
    return CLIPScoreReward.from_modules(model, processor, CLIPScoreReward.Config(device="cpu", **config))
