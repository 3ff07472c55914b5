"""``flux``: FLUX.1-dev and FLUX.1-schnell through diffusers.

Components (diffusers layout): ``transformer`` (``FluxTransformer2DModel``), ``vae``
(``AutoencoderKL``, 16 channels, scaling 0.3611 and shift 0.1159), ``text_encoder`` /
``tokenizer`` (CLIP-L, pooled output only) and ``text_encoder_2`` / ``tokenizer_2`` (T5-XXL).

Behind the Policy protocol latents are the unpacked VAE latents ``(16, H/8, W/8)``; the
transformer sees them packed into 2x2 patches ``(N, H/16 * W/16, 64)`` with positional
``img_ids`` and zero ``txt_ids``, exactly as ``FluxPipeline``. The transformer takes
``timestep = sigma`` (the pipeline divides its ``1000 * sigma`` timesteps by 1000).

Guidance: FLUX.1-dev is guidance-distilled: ``embedded_guidance_scale`` (the pipeline's
``guidance_scale``, 3.5 by default) is fed to the transformer's guidance embedding and
costs nothing. True classifier-free guidance with a negative prompt is the adapter's
``guidance_scale`` (the pipeline's ``true_cfg_scale``), off by default. Schnell has no
guidance embedding; its embedded scale is ignored.
"""

from __future__ import annotations

from typing import Any

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
from densegrpo.components.policies.sd3 import tiny_clip_text, vae_decoder
from densegrpo.contracts.protocols import Cond


def pack_latents(latents: Tensor) -> Tensor:
    """``(N, C, h, w)`` -> FLUX tokens ``(N, h/2 * w/2, 4C)`` (2x2 patches, as ``FluxPipeline._pack_latents``)."""
    n, c, h, w = latents.shape
    latents = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`: ``(N, h/2 * w/2, 4C)`` -> ``(N, C, h, w)``."""
    n, _, channels = tokens.shape
    tokens = tokens.view(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(n, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(h/2 * w/2, 3)`` positional ids of the packed image tokens (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_forward(embedded_guidance: float | None):
    """A forward for :class:`FlowModelParts`: packs, calls ``FluxTransformer2DModel``, unpacks."""

    def forward(transformer: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        n, _, h, w = x.shape
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((n,), float(embedded_guidance or 0.0), device=x.device, dtype=torch.float32)
        text_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x.device, dtype=cond.prompt_embeds.dtype)
        out = transformer(
            hidden_states=pack_latents(x),
            timestep=sigma.to(x.dtype),
            guidance=guidance,
            pooled_projections=cond.pooled_embeds,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=text_ids,
            img_ids=latent_image_ids(h, w, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    return forward


class FluxPolicy(TinyRandomPolicy, FlowTransformerPolicy):
    """FLUX.1 with LoRA: latent ``(16, H/8, W/8)`` (unpacked), images ``(N, 3, H, W)``.

    ``FluxPolicy(config)`` loads ``config.model``; ``FluxPolicy(config, components=...)``
    takes already-built modules (keys as in ``FluxPipeline``); see :meth:`tiny_random`.
    """

    class Config(DiffusersPolicyConfig):
        """FLUX.1 options."""

        model: str | None = Field("black-forest-labs/FLUX.1-dev", description="Hub id or local folder (FLUX.1-dev or FLUX.1-schnell).")
        resolution: int = Field(512, ge=16, description="Image height and width in pixels (a multiple of 16).")
        guidance_scale: float = Field(
            1.0, ge=0, description="True classifier-free guidance with the negative prompt (FluxPipeline's true_cfg_scale); <= 1 disables it."
        )
        embedded_guidance_scale: float = Field(
            3.5, ge=0, description="Distilled guidance fed to FLUX.1-dev's guidance embedding (FluxPipeline's guidance_scale); ignored by schnell."
        )
        max_sequence_length: int = Field(512, ge=1, le=512, description="T5 tokens per prompt (dev: 512, schnell: 256).")
        text_encoder_device: str | None = Field(
            None,
            description="Where CLIP-L and T5-XXL run, e.g. 'cpu' to keep their ~9.8 GB (bf16) off the accelerator (each "
            "distinct prompt is encoded once and cached; on a CPU, T5-XXL takes seconds a prompt); None: the policy's device.",
        )

    def __init__(self, config: Config | None = None, components: dict[str, Any] | None = None):
        config = config if config is not None else self.Config()
        dtype = resolve_dtype(config.dtype)
        if components is None:
            components = load_flux_components(config, dtype)
        components = dict(components)
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        # The text encoders live on their own device and are frozen here: the adapter moves its frozen_modules
        # to the policy's device, which text_encoder_device must be free to avoid.
        text_device = torch.device(config.text_encoder_device or config.device)
        for name in ("text_encoder", "text_encoder_2"):
            components[name] = components[name].to(text_device, dtype).requires_grad_(False).eval()
        components["vae"] = move_module(components["vae"], config.device, vae_dtype(config))
        self.pipeline = FluxPipeline(
            scheduler=components.pop("scheduler", None) or FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), **components
        )
        vae = components["vae"]
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if config.resolution % (factor * 2):
            raise ValueError(f"resolution {config.resolution} must be a multiple of {factor * 2} for FLUX's 2x2 packing; use e.g. 512")
        size = config.resolution // factor
        pipeline = self.pipeline

        def encode(prompts: list[str]) -> Cond:
            # on the text encoders' device; the prompt cache keeps rows on the CPU and hands them over on `device`
            embeds, pooled, _ = pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, device=text_device, max_sequence_length=config.max_sequence_length
            )
            return Cond(prompt_embeds=embeds.to(dtype), pooled_embeds=pooled.to(dtype), prompts=list(prompts))

        parts = FlowModelParts(
            transformer=components["transformer"],
            encode=encode,
            forward=flux_forward(config.embedded_guidance_scale),
            decode=vae_decoder(vae),
            latent_shape=(int(components["transformer"].config.in_channels) // 4, size, size),
            lora_pipeline=FluxPipeline,
            frozen_modules=(vae,),
        )
        super().__init__(parts, config)
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    @classmethod
    def tiny_parts(cls, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Random tiny FLUX components and the config they fit (:class:`TinyRandomPolicy`)."""
        return tiny_flux_components(seed), dict(resolution=32, lora={"rank": 4, "alpha": 8.0}, max_sequence_length=16, model=None)


def load_flux_components(config: FluxPolicy.Config, dtype: torch.dtype) -> dict[str, Any]:
    """Load the FLUX components of ``config.model``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import (
        CLIPTextModel,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    from densegrpo.contracts.tokenizers import CLIP_VOCAB_SIZE, check_tokenizer_size

    model, opts = hub_model(config, "FLUX.1")
    out = {
        "transformer": hub_load(FluxTransformer2DModel.from_pretrained, "FLUX transformer", model, subfolder="transformer", torch_dtype=dtype, **opts),
        "vae": hub_load(AutoencoderKL.from_pretrained, "FLUX VAE", model, subfolder="vae", torch_dtype=dtype, **opts),
        "text_encoder": hub_load(CLIPTextModel.from_pretrained, "CLIP-L text encoder", model, subfolder="text_encoder", dtype=dtype, **opts),
        "text_encoder_2": hub_load(T5EncoderModel.from_pretrained, "T5 text encoder", model, subfolder="text_encoder_2", dtype=dtype, **opts),
        "tokenizer": hub_load(CLIPTokenizer.from_pretrained, "CLIP-L tokenizer", model, subfolder="tokenizer", **opts),
        "tokenizer_2": hub_load(T5TokenizerFast.from_pretrained, "T5 tokenizer", model, subfolder="tokenizer_2", **opts),
    }
    check_tokenizer_size(out["tokenizer"], CLIP_VOCAB_SIZE, "CLIP-L")
    return out


def tiny_t5_tokenizer():
    """A small word-level T5 tokenizer for tests (the real one cannot be built offline).

    Unigram vocabulary: T5's specials, ``▁``, lowercase letters and a few words, so any
    lowercase prompt tokenizes (rare words fall back to letters).
    """
    from transformers import T5Tokenizer

    words = "a photo of an the and red green blue yellow circle square triangle cat dog two three left right above below".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(seed: int, vocab_size: int, d_model: int = 32) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def tiny_flux_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random FLUX components (the shapes of diffusers' own FLUX pipeline tests)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
    )

    from densegrpo.contracts.tokenizers import clip_tokenizer

    tokenizer_2 = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8], guidance_embeds=True,
        ).eval()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
            latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5035,
        ).eval()
        text_encoder = tiny_clip_text(seed + 2, hidden=32, with_projection=False)
        text_encoder_2 = tiny_t5_encoder(seed + 3, vocab_size=len(tokenizer_2))
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer(77),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
    }


__all__ = [
    "FluxPolicy",
    "flux_forward",
    "latent_image_ids",
    "load_flux_components",
    "pack_latents",
    "tiny_flux_components",
    "tiny_t5_tokenizer",
    "unpack_latents",
]
