"""``wan``: Wan2.1 text-to-video (1.3B, 14B) through diffusers' ``WanPipeline``.

Components (diffusers layout): ``transformer`` (``WanTransformer3DModel``), ``vae``
(``AutoencoderKLWan``, 16 latent channels, 4x temporal and 8x spatial compression, per-channel
``latents_mean`` / ``latents_std``), ``text_encoder`` / ``tokenizer`` (UMT5-XXL).

Behind the Policy protocol a latent has a frame axis: ``(C, F, h, w)`` with
``F = (num_frames - 1) / 4 + 1`` latent frames, ``h = height / 8`` and ``w = width / 8``;
decoded videos are ``(N, F_out, 3, H, W)`` float32 in [0, 1] with ``F_out = num_frames``
frames (the layout of ``WanPipeline(output_type="pt")``, which Flow-GRPO's train_wan2_1.py
hands its video rewards). The transformer takes ``timestep = 1000 * sigma`` as the pipeline.

Guidance is classifier-free with a negative prompt (the pipeline's ``guidance_scale``; Flow-GRPO
samples Wan2.1 at 4.5). UMT5-XXL is ~5.7B parameters (11 GB in bf16): ``text_encoder_device:
cpu`` keeps it off the accelerator (each distinct prompt is encoded once and cached).

Wan2.2 is not supported yet, and the policy says so when pointed at it: T2V-A14B denoises with
two transformers (``transformer`` above ``boundary_ratio``, ``transformer_2`` below), while the
shared adapter trains, disables (reference) and saves exactly one; TI2V-5B runs
``expand_timesteps`` (one timestep per token) with a 48-channel VAE of 16x spatial compression.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from densegrpo.components.policies.adapter import (
    DiffusersPolicyConfig,
    FlowModelParts,
    FlowTransformerPolicy,
    TinyRandomPolicy,
    hub_load,
    hub_model,
    move_module,
    resolve_dtype,
    vae_dtype,
)
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import Cond

WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""LoRA targets for Wan2.1: the q/k/v/out projections of self- (``attn1``) and cross-attention
(``attn2``) of every block. Flow-GRPO's train_wan2_1.py lists these plus ``add_q/k/v_proj`` and
``to_add_out`` (r=32, alpha=64, gaussian); the text-to-video transformer has no ``add_q_proj`` /
``to_add_out`` and its ``add_k/v_proj`` exist only for image conditioning (I2V), so the
projections that exist in T2V are the ones kept."""


def wan_forward(transformer: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
    """One ``WanTransformer3DModel`` call: ``x (N,C,F,h,w)``, ``sigma (N,)`` -> velocity ``(N,C,F,h,w)``.

    ``WanPipeline`` passes the scheduler's timestep ``1000 * sigma``.
    """
    return transformer(
        hidden_states=x,
        timestep=sigma.float() * 1000.0,
        encoder_hidden_states=cond.prompt_embeds,
        return_dict=False,
    )[0]


def wan_video_decoder(vae: nn.Module) -> Any:
    """``latents (N,C,F,h,w) -> videos (N,F_out,3,H,W)`` in [0,1], as ``WanPipeline`` decodes.

    The pipeline un-normalises each channel (``x * latents_std + latents_mean``), decodes to
    ``(N,3,F_out,H,W)`` in [-1,1] and ``postprocess_video(output_type="pt")`` moves frames first.
    """
    channels = int(vae.config.z_dim)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, channels, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, channels, 1, 1, 1)

    def decode(latents: Tensor) -> Tensor:
        raw = latents.float() * std.to(latents.device) + mean.to(latents.device)
        video = vae.decode(raw.to(vae.dtype), return_dict=False)[0]  # (N, 3, F_out, H, W)
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)

    return decode


class WanPolicy(TinyRandomPolicy, FlowTransformerPolicy):
    """Wan2.1 text-to-video with LoRA: latent ``(16, F, H/8, W/8)``, videos ``(N, num_frames, 3, H, W)``.

    ``WanPolicy(config)`` loads ``config.model``; ``WanPolicy(config, components=...)`` takes
    already-built modules (keys as in ``WanPipeline``); see :meth:`tiny_random`.
    """

    class Config(DiffusersPolicyConfig):
        """Wan2.1 options (defaults: Flow-GRPO's general_ocr_wan2_1 in config/grpo.py)."""

        model: str | None = Field("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", description="Hub id or local folder (Wan2.1 T2V 1.3B or 14B, diffusers layout).")
        height: int = Field(240, ge=16, description="Video height in pixels, a multiple of 16 (Flow-GRPO: 240).")
        width: int = Field(416, ge=16, description="Video width in pixels, a multiple of 16 (Flow-GRPO: 416).")
        num_frames: int = Field(33, ge=1, description="Frames per video; num_frames - 1 must be a multiple of 4 (Flow-GRPO: 33).")
        guidance_scale: float = Field(4.5, ge=0, description="Classifier-free guidance scale; <= 1 disables it (Flow-GRPO: 4.5).")
        max_sequence_length: int = Field(512, ge=1, le=512, description="UMT5 tokens per prompt (Flow-GRPO and WanPipeline: 512).")
        gradient_checkpointing: bool = Field(
            True, description="Recompute each transformer block in the backward pass instead of storing its activations "
            "(Flow-GRPO's train_wan2_1.py enables it): ~7 GB less per 240x416x33 video on the 1.3B model (docs/policies.md), one more forward per backward."
        )
        text_encoder_device: str | None = Field(
            None, description="Where UMT5 runs, e.g. 'cpu' to keep its ~11 GB (bf16) off the accelerator; None: the policy's device."
        )
        vae_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
            "float32", description="dtype of the VAE's weights and of decoding; None: `dtype` (Flow-GRPO's train_wan2_1.py keeps the Wan VAE in float32)."
        )

    def __init__(self, config: Config | None = None, components: dict[str, Any] | None = None):
        config = config if config is not None else self.Config()
        dtype = resolve_dtype(config.dtype)
        if components is None:
            components = load_wan_components(config, dtype)
        components = dict(components)
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

        if components.get("transformer_2") is not None:
            raise UserError("the wan policy trains Wan2.1's single transformer; Wan2.2's two-expert models (transformer_2) are not supported yet")
        components.pop("transformer_2", None)
        text_device = torch.device(config.text_encoder_device or config.device)
        components["text_encoder"] = components["text_encoder"].to(text_device, dtype)
        components["vae"] = move_module(components["vae"], config.device, vae_dtype(config))  # float32 by default, as Flow-GRPO
        self.pipeline = WanPipeline(scheduler=components.pop("scheduler", None) or FlowMatchEulerDiscreteScheduler(shift=3.0), **components)
        vae = components["vae"]
        temporal, spatial = int(vae.config.scale_factor_temporal), int(vae.config.scale_factor_spatial)
        patch = int(components["transformer"].config.patch_size[1])
        for name, size in (("height", config.height), ("width", config.width)):
            if size % (spatial * patch):
                raise UserError(f"wan {name} {size} must be a multiple of {spatial * patch}; use e.g. 240 x 416")
        if (config.num_frames - 1) % temporal:
            raise UserError(f"wan num_frames {config.num_frames} must be {temporal} k + 1 (e.g. 33 or 81) for the VAE's {temporal}x time compression")
        latent_shape = (
            int(components["transformer"].config.in_channels),
            (config.num_frames - 1) // temporal + 1,
            config.height // spatial,
            config.width // spatial,
        )
        device = torch.device(config.device)
        pipeline = self.pipeline

        def encode(prompts: list[str]) -> Cond:
            embeds, _ = pipeline.encode_prompt(
                prompt=prompts, do_classifier_free_guidance=False, device=text_device,
                max_sequence_length=config.max_sequence_length,
            )
            return Cond(prompt_embeds=embeds.to(device, dtype), prompts=list(prompts))

        parts = FlowModelParts(
            transformer=components["transformer"],
            encode=encode,
            forward=wan_forward,
            decode=wan_video_decoder(vae),
            latent_shape=latent_shape,  # type: ignore[arg-type]
            lora_pipeline=WanPipeline,
            frozen_modules=(vae,),
            default_lora_targets=WAN_LORA_TARGETS,
        )
        super().__init__(parts, config)
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        components["text_encoder"].requires_grad_(False).eval()

    @classmethod
    def tiny_parts(cls, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Random tiny Wan components and the config they fit (:class:`TinyRandomPolicy`)."""
        return tiny_wan_components(seed), dict(height=16, width=16, num_frames=5, lora={"rank": 4, "alpha": 8.0}, max_sequence_length=16, model=None)


def load_wan_components(config: WanPolicy.Config, dtype: torch.dtype) -> dict[str, Any]:
    """Load the Wan2.1 components of ``config.model``; a Wan2.2 folder stops with a UserError."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    model, opts = hub_model(config, "Wan2.1 T2V")
    index = hub_load(WanPipeline.load_config, "Wan pipeline index", model, subfolder=None, **opts)
    two_experts = index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[0] is not None
    if two_experts or index.get("expand_timesteps"):
        raise UserError(
            f"'{model}' is a Wan2.2 model (two transformers or per-token timesteps); the wan policy supports Wan2.1 T2V "
            "(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) only"
        )
    return {
        "transformer": hub_load(WanTransformer3DModel.from_pretrained, "Wan transformer", model, subfolder="transformer", torch_dtype=dtype, **opts),
        "vae": hub_load(AutoencoderKLWan.from_pretrained, "Wan VAE", model, subfolder="vae", torch_dtype=torch.float32, **opts),
        "text_encoder": hub_load(UMT5EncoderModel.from_pretrained, "UMT5 text encoder", model, subfolder="text_encoder", dtype=dtype, **opts),
        "tokenizer": hub_load(AutoTokenizer.from_pretrained, "UMT5 tokenizer", model, subfolder="tokenizer", **opts),
    }


def tiny_wan_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random Wan components (the shapes of diffusers' own Wan pipeline tests)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanTransformer3DModel,
    )

    from densegrpo.components.policies.flux import tiny_t5_encoder, tiny_t5_tokenizer

    tokenizer = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]).eval()
        torch.manual_seed(seed + 1)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval()
        text_encoder = tiny_t5_encoder(seed + 2, vocab_size=len(tokenizer))
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


__all__ = ["WAN_LORA_TARGETS", "WanPolicy", "load_wan_components", "tiny_wan_components", "wan_forward", "wan_video_decoder"]
