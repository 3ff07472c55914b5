"""``toy``: a tiny text-conditioned flow-matching model in pixel space, shipped with the package.

The generator is a small diffusers ``SD3Transformer2DModel`` (MMDiT, patch 4, 4 joint
blocks) conditioned on a tiny transformers ``CLIPTextModelWithProjection`` that reads
CLIP's real BPE tokenizer (built offline from open_clip's vocabulary). The latent is the
image itself, ``x = 2 * image - 1`` of shape ``(3, 32, 32)``, and the policy runs through
the same :class:`~densegrpo.policies.adapter.FlowTransformerPolicy` and SD3 transformer
call as :class:`~densegrpo.policies.sd3.SD3Policy` (timestep ``= 1000 * sigma``).

The weights under ``densegrpo/toy/weights/toy_policy/`` (``transformer/`` and
``text_encoder/``, diffusers/transformers layout) were trained by
``scripts/pretrain_toy_policy.py`` with the rectified-flow loss on the toy scenes.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from densegrpo.errors import UserError
from densegrpo.policies.adapter import FlowModelParts, FlowPolicyConfig, FlowTransformerPolicy, LoRAConfig, hub_load
from densegrpo.policies.sd3 import sd3_transformer_forward
from densegrpo.protocols import Cond

TOY_RESOLUTION = 32
TOY_MAX_TOKENS = 24

TOY_TRANSFORMER_CONFIG = dict(
    sample_size=TOY_RESOLUTION,
    patch_size=4,
    in_channels=3,
    out_channels=3,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=3,
    joint_attention_dim=64,
    caption_projection_dim=96,
    pooled_projection_dim=64,
    pos_embed_max_size=TOY_RESOLUTION // 4,
    qk_norm="rms_norm",
)
"""Architecture of the toy ``SD3Transformer2DModel`` (about 1.3 M parameters)."""

TOY_TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    projection_dim=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=TOY_MAX_TOKENS,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
"""Architecture of the toy ``CLIPTextModelWithProjection`` (CLIP's vocabulary, 2 layers)."""

WEIGHTS_PACKAGE = "densegrpo.toy"
WEIGHTS_FOLDER = "weights/toy_policy"


def packaged_weights() -> Path:
    """Folder of the shipped toy weights inside the installed package."""
    return Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_FOLDER)))


@functools.lru_cache(maxsize=4)
def _tokenizer(max_length: int):
    from densegrpo.tokenizers import clip_tokenizer

    return clip_tokenizer(model_max_length=max_length)


def build_toy_modules(weights: str = "pretrained", folder: str | Path | None = None, seed: int = 0):
    """``(transformer, text_encoder)``: the shipped weights, a local folder, or random init."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = SD3Transformer2DModel(**TOY_TRANSFORMER_CONFIG)
            text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**TOY_TEXT_ENCODER_CONFIG))
        return transformer, text_encoder
    root = Path(folder) if folder is not None else packaged_weights()
    if not (root / "transformer" / "config.json").exists():
        raise UserError(
            f"toy policy weights are missing in '{root}'; reinstall densegrpo, run "
            "scripts/pretrain_toy_policy.py, or set policy config weights: random"
        )
    transformer = hub_load(SD3Transformer2DModel.from_pretrained, "toy transformer", str(root),
                           subfolder="transformer", local_files_only=True, torch_dtype=torch.float32)
    text_encoder = hub_load(CLIPTextModelWithProjection.from_pretrained, "toy text encoder", str(root),
                            subfolder="text_encoder", local_files_only=True, dtype=torch.float32)
    return transformer, text_encoder


def encode_toy_prompts(tokenizer, text_encoder, prompts: list[str], dtype: torch.dtype | None = None) -> Cond:
    """Prompts -> ``Cond``: ``prompt_embeds (N, 24, 64)`` = last hidden state, ``pooled (N, 64)`` = text projection."""
    device = text_encoder.device
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    out = text_encoder(input_ids=ids)
    embeds, pooled = out.last_hidden_state, out.text_embeds
    if dtype is not None:
        embeds, pooled = embeds.to(dtype), pooled.to(dtype)
    return Cond(prompt_embeds=embeds, pooled_embeds=pooled, prompts=list(prompts))


def pixels_to_latents(images: Tensor) -> Tensor:
    """Images ``(N,3,32,32)`` in [0, 1] -> toy latents in [-1, 1]."""
    return images * 2 - 1


def latents_to_pixels(latents: Tensor) -> Tensor:
    """Toy latents ``(N,3,32,32)`` -> images float32 in [0, 1] (clamped)."""
    return ((latents.float() + 1) / 2).clamp(0, 1)


class ToyPolicy(FlowTransformerPolicy):
    """The embedded toy generator: latent ``(3, 32, 32)`` pixels, images ``(N, 3, 32, 32)``."""

    class Config(FlowPolicyConfig):
        """Toy policy options; the shared fields are those of every diffusers policy."""

        weights: Literal["pretrained", "random"] = Field(
            "pretrained", description="'pretrained': the shipped weights (or `model`); 'random': fresh init (tests)."
        )
        seed: int = Field(0, description="Seed of the random init when weights is 'random'.")
        model: str | None = Field(
            None, description="Local folder with transformer/ and text_encoder/ (as written by scripts/pretrain_toy_policy.py); None: the shipped weights."
        )
        guidance_scale: float = Field(
            1.0, ge=0, description="CFG scale; the toy model was trained with 10% empty prompts so CFG works, but 1 (off) halves the cost."
        )
        lora: LoRAConfig = Field(
            default_factory=lambda: LoRAConfig(rank=8, alpha=16.0),
            description="LoRA settings; the toy's blocks are 96 wide so rank 8 (alpha/r = 2 as in the paper).",
        )

    def __init__(self, config: Config | None = None):
        config = config if config is not None else self.Config()
        transformer, text_encoder = build_toy_modules(config.weights, config.model, config.seed)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
        text_encoder = text_encoder.to(config.device, dtype)
        tokenizer = _tokenizer(int(text_encoder.config.max_position_embeddings))
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        from diffusers import StableDiffusion3Pipeline

        parts = FlowModelParts(
            transformer=transformer,
            encode=lambda prompts: encode_toy_prompts(tokenizer, text_encoder, prompts, dtype),
            forward=sd3_transformer_forward,
            decode=latents_to_pixels,
            latent_shape=(3, TOY_RESOLUTION, TOY_RESOLUTION),
            lora_pipeline=StableDiffusion3Pipeline,
            frozen_modules=(text_encoder,),
        )
        super().__init__(parts, config)


__all__ = [
    "TOY_TEXT_ENCODER_CONFIG",
    "TOY_TRANSFORMER_CONFIG",
    "ToyPolicy",
    "build_toy_modules",
    "encode_toy_prompts",
    "latents_to_pixels",
    "packaged_weights",
    "pixels_to_latents",
]
