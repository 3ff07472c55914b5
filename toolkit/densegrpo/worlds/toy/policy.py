"""``toy``: a tiny text-conditioned flow-matching model in pixel space, shipped with the package.

The generator is a small diffusers ``UNet2DConditionModel`` conditioned on a tiny transformers
``CLIPTextModelWithProjection`` that reads CLIP's real BPE tokenizer (built offline from
open_clip's vocabulary): token embeddings go to cross-attention, the pooled embedding is added
to the timestep embedding. The latent is the image itself, ``x = 2 * image - 1`` of shape
``(3, 32, 32)``. The policy runs through the same
:class:`~densegrpo.components.policies.adapter.FlowTransformerPolicy` as ``sd3`` and ``flux`` (prompt
cache, CFG, peft LoRA, reference, diffusers LoRA files); like SD3 it takes
``timestep = 1000 * sigma``.

Why a UNet and not a tiny ``SD3Transformer2DModel``: the MMDiT (patch 4, 4 blocks, 1.3 M
parameters) was tried first and, after about 5000 steps of the same pretraining (34
wall-clock minutes on the shared 2-core machine), still drew colour blobs at roughly the right
places but no recognisable shapes (toy-GenEval partial 0.06); a convolutional UNet of similar
size reached 0.38 after 1000 steps. The MMDiT path is exercised by ``sd3`` with tiny random
components in the tests.

The weights under ``densegrpo/worlds/toy/weights/toy_policy/`` (``unet/`` and ``text_encoder/``,
diffusers/transformers layout) were trained by ``scripts/pretrain_toy_policy.py`` with the
rectified-flow loss on the toy scenes.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from densegrpo.components.policies.adapter import (
    FlowModelParts,
    FlowPolicyConfig,
    FlowTransformerPolicy,
    LoRAConfig,
    hub_load,
)
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import Cond

TOY_RESOLUTION = 32
TOY_MAX_TOKENS = 24
TOY_RESOLUTIONS = (32, 16)
"""Latent sizes with shipped weights. 16 is the same UNet on 16x16 pixels (3 x 16 x 16 = 768
noise dimensions instead of 3072, about 5x cheaper per forward pass), fine-tuned from the 32 px
weights with the 32 px text encoder frozen; its images are upsampled to 32 px by ``decode``."""

TOY_UNET_CONFIG = dict(
    sample_size=TOY_RESOLUTION,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
    class_embed_type="projection",
    projection_class_embeddings_input_dim=64,
)
"""Architecture of the toy ``UNet2DConditionModel`` (about 1.7 M parameters): cross-attention on
the token embeddings at 16x16 and 8x8, the pooled embedding added to the timestep embedding."""

TOY_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""LoRA targets of the toy: the q, k, v and out projections of every attention (the UNet has no
added-context projections, which Flow-GRPO also targets on SD3)."""

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

WEIGHTS_PACKAGE = "densegrpo.worlds.toy"
WEIGHTS_FOLDER = "weights/toy_policy"


def packaged_weights(resolution: int = TOY_RESOLUTION) -> Path:
    """Folder of the shipped toy weights inside the installed package (``unet/`` and, at 32 px,
    ``text_encoder/``; the 16 px model shares the 32 px text encoder)."""
    folder = WEIGHTS_FOLDER if resolution == TOY_RESOLUTION else f"{WEIGHTS_FOLDER}_{resolution}"
    return Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(folder)))


@functools.lru_cache(maxsize=4)
def _tokenizer(max_length: int):
    from densegrpo.contracts.tokenizers import clip_tokenizer

    return clip_tokenizer(model_max_length=max_length)


@contextmanager
def quiet_transformers_loading() -> Iterator[None]:
    """No "Loading weights" bar from transformers: the toy's text encoder loads in milliseconds,
    and the bar would be a second line under a command's one-line error."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def build_toy_modules(weights: str = "pretrained", folder: str | Path | None = None, seed: int = 0,
                      resolution: int = TOY_RESOLUTION):
    """``(unet, text_encoder)``: the shipped weights for ``resolution``, a local folder, or random init.

    A folder without ``text_encoder/`` (the 16 px model) takes the shipped 32 px text encoder.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if resolution not in TOY_RESOLUTIONS:
        raise UserError(f"toy policy resolution {resolution} has no weights; use one of {list(TOY_RESOLUTIONS)}")
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**{**TOY_UNET_CONFIG, "sample_size": resolution})
            text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**TOY_TEXT_ENCODER_CONFIG))
        return unet, text_encoder
    root = Path(folder) if folder is not None else packaged_weights(resolution)
    if not (root / "unet" / "config.json").exists():
        raise UserError(
            f"toy policy weights are missing in '{root}'; reinstall densegrpo, run "
            "scripts/pretrain_toy_policy.py, or set policy config weights: random"
        )
    text_root = root if (root / "text_encoder" / "config.json").exists() else packaged_weights()
    unet = hub_load(UNet2DConditionModel.from_pretrained, "toy UNet", str(root),
                    subfolder="unet", local_files_only=True, torch_dtype=torch.float32)
    with quiet_transformers_loading():
        text_encoder = hub_load(CLIPTextModelWithProjection.from_pretrained, "toy text encoder", str(text_root),
                                subfolder="text_encoder", local_files_only=True, dtype=torch.float32)
    return unet, text_encoder


def unet_forward(unet: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
    """One ``UNet2DConditionModel`` call: ``x (N,3,32,32)``, ``sigma (N,)`` -> velocity ``(N,3,32,32)``.

    ``timestep = 1000 * sigma`` as for SD3; token embeddings feed cross-attention and the pooled
    embedding the class-embedding projection.
    """
    return unet(
        x,
        sigma.float() * 1000.0,
        encoder_hidden_states=cond.prompt_embeds,
        class_labels=cond.pooled_embeds,
        return_dict=False,
    )[0]


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
    """Toy latents ``(N,3,R,R)`` -> images float32 in [0, 1] (clamped), upsampled (bilinear) to
    at least 32 x 32 so every reward sees the toy world's image size."""
    images = ((latents.float() + 1) / 2).clamp(0, 1)
    if images.shape[-1] < TOY_RESOLUTION:
        images = torch.nn.functional.interpolate(images, size=(TOY_RESOLUTION, TOY_RESOLUTION), mode="bilinear", align_corners=False)
    return images


TOY_LORA = {"rank": 8, "alpha": 16.0}
"""The toy's LoRA defaults, which a partial ``lora`` override keeps."""


class ToyPolicy(FlowTransformerPolicy):
    """The embedded toy generator: latent ``(3, 32, 32)`` pixels, images ``(N, 3, 32, 32)``."""

    class Config(FlowPolicyConfig):
        """Toy policy options; the shared fields are those of every diffusers policy."""

        weights: Literal["pretrained", "random"] = Field(
            "pretrained", description="'pretrained': the shipped weights (or `model`); 'random': fresh init (tests)."
        )
        seed: int = Field(0, description="Seed of the random init when weights is 'random'.")
        resolution: Literal[32, 16] = Field(
            32,
            description="Pixel size of the latent: 32 (the 32 x 32 model) or 16 (the same UNet fine-tuned on 16 x 16 scenes: "
            "4x fewer noise dimensions and about 5x cheaper per forward pass; images are upsampled to 32 px).",
        )
        model: str | None = Field(
            None, description="Local folder with unet/ and text_encoder/ (as written by scripts/pretrain_toy_policy.py; without "
            "text_encoder/ the shipped one is used, as for --freeze-text-encoder); None: the shipped weights for `resolution`."
        )
        guidance_scale: float = Field(
            1.0, ge=0, description="CFG scale; the toy model was trained with 10% empty prompts so CFG works, but 1 (off) halves the cost."
        )
        lora: LoRAConfig = Field(
            default_factory=lambda: LoRAConfig(**TOY_LORA),
            description="LoRA settings; the toy's attention is 32-64 wide so rank 8 (alpha/r = 2 as in the paper), on q/k/v/out. "
            "Fields not given keep these toy defaults (setting only target_modules keeps rank 8).",
        )

        @field_validator("lora", mode="before")
        @classmethod
        def _toy_lora_defaults(cls, value: Any) -> Any:
            # a partial override such as {"target_modules": [...]} must not fall back to LoRAConfig's rank 32
            return {**TOY_LORA, **value} if isinstance(value, dict) else value

    def __init__(self, config: Config | None = None):
        config = config if config is not None else self.Config()
        unet, text_encoder = build_toy_modules(config.weights, config.model, config.seed, config.resolution)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
        text_encoder = text_encoder.to(config.device, dtype)
        tokenizer = _tokenizer(int(text_encoder.config.max_position_embeddings))
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        from diffusers import StableDiffusionPipeline

        parts = FlowModelParts(
            transformer=unet,
            encode=lambda prompts: encode_toy_prompts(tokenizer, text_encoder, prompts, dtype),
            forward=unet_forward,
            decode=latents_to_pixels,
            latent_shape=(3, config.resolution, config.resolution),
            lora_pipeline=StableDiffusionPipeline,
            lora_prefix="unet",
            default_lora_targets=tuple(TOY_LORA_TARGETS),
            frozen_modules=(text_encoder,),
        )
        super().__init__(parts, config)


__all__ = [
    "TOY_TEXT_ENCODER_CONFIG",
    "TOY_LORA_TARGETS",
    "TOY_RESOLUTIONS",
    "TOY_UNET_CONFIG",
    "ToyPolicy",
    "build_toy_modules",
    "encode_toy_prompts",
    "latents_to_pixels",
    "packaged_weights",
    "pixels_to_latents",
    "unet_forward",
]
