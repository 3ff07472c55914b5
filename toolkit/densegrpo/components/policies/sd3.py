"""``sd3``: Stable Diffusion 3 / 3.5 (Medium, Large) through diffusers.

Components (diffusers layout, hub id or local folder): ``transformer``
(``SD3Transformer2DModel``), ``vae`` (``AutoencoderKL``, 16 latent channels), ``text_encoder``
/ ``tokenizer`` (CLIP-L), ``text_encoder_2`` / ``tokenizer_2`` (CLIP-G) and, optionally,
``text_encoder_3`` / ``tokenizer_3`` (T5-XXL). Without T5 (``drop_t5``, or a folder that
lacks ``text_encoder_3``) the T5 tokens are zeros, the memory saver diffusers documents
for SD3.

Prompts are encoded by ``StableDiffusion3Pipeline.encode_prompt`` itself (a pipeline
object is built from the components; its scheduler never samples), so embeddings match
diffusers exactly. The transformer takes ``timestep = 1000 * sigma`` as in the pipeline,
and decoding is ``vae.decode(x / scaling_factor + shift_factor)`` mapped to [0, 1].
"""

from __future__ import annotations

from pathlib import Path
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
from densegrpo.contracts.protocols import Cond

SD3_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")


def sd3_transformer_forward(transformer: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
    """One ``SD3Transformer2DModel`` call: ``x (N,C,h,w)``, ``sigma (N,)`` -> velocity ``(N,C,h,w)``.

    The SD3 pipeline passes the scheduler's timestep ``1000 * sigma`` (float32).
    """
    timestep = sigma.float() * 1000.0
    return transformer(
        hidden_states=x,
        timestep=timestep,
        encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled_embeds,
        return_dict=False,
    )[0]


def vae_decoder(vae: nn.Module) -> Any:
    """``latents (N,C,h,w) -> images (N,3,H,W)`` in [0,1] with the VAE's scaling and shift factors."""
    scaling = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def decode(latents: Tensor) -> Tensor:
        latents = latents / scaling + shift
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize

    return decode


class SD3Policy(TinyRandomPolicy, FlowTransformerPolicy):
    """SD3 / SD3.5 with LoRA: latent ``(16, H/8, W/8)``, images ``(N, 3, H, W)``.

    ``SD3Policy(config)`` loads ``config.model``; ``SD3Policy(config, components=...)``
    takes already-built modules (keys as in ``StableDiffusion3Pipeline``), which is how the
    tests and :meth:`tiny_random` build it.
    """

    class Config(DiffusersPolicyConfig):
        """SD3/SD3.5 options (defaults: Flow-GRPO / DenseGRPO on SD3.5-Medium, method.md section 2)."""

        model: str | None = Field(
            "stabilityai/stable-diffusion-3.5-medium", description="Hub id or local folder in diffusers layout (SD3 or SD3.5)."
        )
        resolution: int = Field(512, ge=16, description="Image height and width in pixels (Flow-GRPO: 512).")
        drop_t5: bool = Field(
            False, description="Do not load T5 (text_encoder_3): zeros replace its tokens, saving ~9 GB (diffusers' SD3 memory tip)."
        )
        max_sequence_length: int = Field(
            256, ge=1, le=512, description="T5 tokens per prompt (diffusers' default 256; Flow-GRPO uses 128)."
        )
        text_encoder_device: str | None = Field(
            None,
            description="Where CLIP-L, CLIP-G and T5-XXL run, e.g. 'cpu' to keep their ~11 GB (bf16) off the accelerator "
            "(each distinct prompt is encoded once and cached; on a CPU, T5-XXL takes seconds a prompt); None: the policy's device.",
        )

    def __init__(self, config: Config | None = None, components: dict[str, Any] | None = None):
        config = config if config is not None else self.Config()
        dtype = resolve_dtype(config.dtype)
        if components is None:
            components = load_sd3_components(config, dtype)
        components = dict(components)
        if config.drop_t5:
            components["text_encoder_3"] = None
            components["tokenizer_3"] = None
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        # The text encoders live on their own device and are frozen here: the adapter moves its frozen_modules
        # to the policy's device, which text_encoder_device must be free to avoid.
        text_device = torch.device(config.text_encoder_device or config.device)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if components.get(name) is not None:
                components[name] = components[name].to(text_device, dtype).requires_grad_(False).eval()
        components["vae"] = move_module(components["vae"], config.device, vae_dtype(config))
        components.setdefault("text_encoder_3", None)
        components.setdefault("tokenizer_3", None)
        # The pipeline object only serves encode_prompt; sampling is the toolkit's.
        self.pipeline = StableDiffusion3Pipeline(
            scheduler=components.pop("scheduler", None) or FlowMatchEulerDiscreteScheduler(shift=3.0), **components
        )
        vae = components["vae"]
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if config.resolution % (factor * components["transformer"].config.patch_size):
            raise ValueError(
                f"resolution {config.resolution} must be a multiple of {factor * components['transformer'].config.patch_size} "
                "(VAE factor x patch size); use e.g. 512"
            )
        size = config.resolution // factor
        pipeline = self.pipeline

        def encode(prompts: list[str]) -> Cond:
            # on the text encoders' device; the prompt cache keeps rows on the CPU and hands them over on `device`
            embeds, _, pooled, _ = pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=text_device,
                do_classifier_free_guidance=False, max_sequence_length=config.max_sequence_length,
            )
            return Cond(prompt_embeds=embeds.to(dtype), pooled_embeds=pooled.to(dtype), prompts=list(prompts))

        parts = FlowModelParts(
            transformer=components["transformer"],
            encode=encode,
            forward=sd3_transformer_forward,
            decode=vae_decoder(vae),
            latent_shape=(int(components["transformer"].config.in_channels), size, size),
            lora_pipeline=StableDiffusion3Pipeline,
            frozen_modules=(vae,),
        )
        super().__init__(parts, config)
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    @classmethod
    def tiny_parts(cls, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Random tiny SD3 components and the config they fit (:class:`TinyRandomPolicy`)."""
        return tiny_sd3_components(seed), dict(resolution=32, lora={"rank": 4, "alpha": 8.0}, max_sequence_length=8, model=None)


def load_sd3_components(config: SD3Policy.Config, dtype: torch.dtype) -> dict[str, Any]:
    """Load the SD3 components of ``config.model`` (T5 only when present and wanted)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import (
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    from densegrpo.contracts.tokenizers import CLIP_VOCAB_SIZE, check_tokenizer_size

    model, opts = hub_model(config, "SD3/SD3.5")
    out: dict[str, Any] = {
        "transformer": hub_load(SD3Transformer2DModel.from_pretrained, "SD3 transformer", model, subfolder="transformer", torch_dtype=dtype, **opts),
        "vae": hub_load(AutoencoderKL.from_pretrained, "SD3 VAE", model, subfolder="vae", torch_dtype=dtype, **opts),
        "text_encoder": hub_load(CLIPTextModelWithProjection.from_pretrained, "CLIP-L text encoder", model, subfolder="text_encoder", dtype=dtype, **opts),
        "text_encoder_2": hub_load(CLIPTextModelWithProjection.from_pretrained, "CLIP-G text encoder", model, subfolder="text_encoder_2", dtype=dtype, **opts),
        "tokenizer": hub_load(CLIPTokenizer.from_pretrained, "CLIP-L tokenizer", model, subfolder="tokenizer", **opts),
        "tokenizer_2": hub_load(CLIPTokenizer.from_pretrained, "CLIP-G tokenizer", model, subfolder="tokenizer_2", **opts),
    }
    check_tokenizer_size(out["tokenizer"], CLIP_VOCAB_SIZE, "CLIP-L")
    check_tokenizer_size(out["tokenizer_2"], CLIP_VOCAB_SIZE, "CLIP-G")
    local = Path(model)
    has_t5 = not local.is_dir() or (local / "text_encoder_3").is_dir()
    if has_t5 and not config.drop_t5:
        out["text_encoder_3"] = hub_load(T5EncoderModel.from_pretrained, "T5 text encoder", model, subfolder="text_encoder_3", dtype=dtype, **opts)
        out["tokenizer_3"] = hub_load(T5TokenizerFast.from_pretrained, "T5 tokenizer", model, subfolder="tokenizer_3", **opts)
    else:
        out["text_encoder_3"], out["tokenizer_3"] = None, None
    return out


def tiny_clip_text(seed: int, hidden: int = 32, projection: int = 32, with_projection: bool = True) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=37, projection_dim=projection,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_sd3_components(seed: int = 0, with_t5: bool = False) -> dict[str, Any]:
    """Tiny random SD3 components (the shapes of diffusers' own SD3 pipeline tests).

    CLIP-L and CLIP-G are 2-layer CLIPs (hidden 32, projection 32) using the offline CLIP
    tokenizer; ``joint_attention_dim = 32 + 32`` matches their concatenation. T5 is left
    out unless ``with_t5`` (a random ``T5EncoderModel`` needs a T5 tokenizer, which cannot
    be built offline here).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
    )

    from densegrpo.contracts.tokenizers import clip_tokenizer

    if with_t5:
        raise ValueError("a T5 tokenizer cannot be built offline; use with_t5=False")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
            pooled_projection_dim=64, out_channels=4,
        ).eval()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
            latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5035,
        ).eval()
        text_encoder = tiny_clip_text(seed + 2)
        text_encoder_2 = tiny_clip_text(seed + 3)
    tokenizer = clip_tokenizer(77)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer,
        "text_encoder_3": None,
        "tokenizer_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


__all__ = ["SD3Policy", "load_sd3_components", "sd3_transformer_forward", "tiny_sd3_components", "vae_decoder"]
