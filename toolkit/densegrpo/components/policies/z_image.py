"""``z-image``: Z-Image (6B single-stream DiT) text-to-image through diffusers' ``ZImagePipeline``.

Components (diffusers layout): ``transformer`` (``ZImageTransformer2DModel``), ``vae``
(``AutoencoderKL``, 16 channels, scaling 0.3611 and shift 0.1159), ``text_encoder`` / ``tokenizer``
(Qwen3-4B, whose second-to-last hidden state over the chat-templated prompt is the encoding).

Behind the Policy protocol latents are the VAE latents ``(16, H/8, W/8)``. The transformer takes a
list of per-sample latents ``(C, 1, h, w)`` and of per-prompt encodings of their own lengths; it
predicts the negated velocity at ``t = 1 - sigma``, as ``ZImagePipeline`` calls it
(:func:`z_image_forward` converts both). Prompts of different lengths travel padded with
``cond.extra["prompt_embeds_mask"]``, as for Qwen-Image.

Guidance is the pipeline's: on for ``guidance_scale > 0``, ``v = v_pos + g (v_pos - v_neg)``
(:func:`z_image_guidance`; ``ZImagePipeline``'s ``pos + g (pos - neg)``, i.e. plain CFG at scale
``1 + g``), with its defaults ``cfg_normalization=False`` and ``cfg_truncation=1.0`` (neither
changes anything then). Z-Image-Turbo is distilled for ``guidance_scale: 0``.
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
from densegrpo.components.policies.lora import LoRAConfig
from densegrpo.components.policies.qwen_image import tiny_qwen_tokenizer
from densegrpo.components.policies.sd3 import vae_decoder
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import Cond

Z_IMAGE_LORA_TARGETS = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
"""Flow-Factory's Z-Image LoRA targets (``ZImageAdapter.default_target_modules``,
src/flow_factory/models/z_image/z_image.py; r=64, alpha=128 in examples/grpo/lora/z_image/default.yaml):
attention and SwiGLU FFN of every block, the refiners' included. Flow-GRPO has no Z-Image trainer."""

MASK = "prompt_embeds_mask"


def z_image_forward(transformer: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
    """One ``ZImageTransformer2DModel`` call: ``x (N,C,h,w)``, ``sigma (N,)`` -> velocity ``(N,C,h,w)``.

    ``ZImagePipeline`` feeds ``t = (1000 - 1000 sigma) / 1000``, each prompt's real tokens only,
    and negates the output.
    """
    mask = cond.extra[MASK].bool()
    captions = [embeds[keep] for embeds, keep in zip(cond.prompt_embeds, mask)]
    out = transformer(list(x.unsqueeze(2).unbind(0)), 1.0 - sigma.to(x.dtype), captions, return_dict=False)[0]
    return -torch.stack(out, dim=0).squeeze(2)


def z_image_guidance(v_negative: Tensor, v_positive: Tensor, scale: float) -> Tensor:
    """``ZImagePipeline``'s CFG ``v_pos + g (v_pos - v_neg)`` (plain CFG at scale ``1 + g``); ``(N,C,h,w)`` float32."""
    return v_positive + scale * (v_positive - v_negative)


class ZImagePolicy(TinyRandomPolicy, FlowTransformerPolicy):
    """Z-Image with LoRA: latent ``(16, H/8, W/8)``, images ``(N, 3, H, W)``.

    ``ZImagePolicy(config)`` loads ``config.model``; ``ZImagePolicy(config, components=...)`` takes
    already-built modules (keys as in ``ZImagePipeline``); see :meth:`tiny_random`.
    """

    class Config(DiffusersPolicyConfig):
        """Z-Image options (defaults: Flow-Factory's examples/grpo/lora/z_image/default.yaml)."""

        model: str | None = Field("Tongyi-MAI/Z-Image", description="Hub id or local folder (Z-Image or Z-Image-Turbo, diffusers layout).")
        resolution: int = Field(512, ge=16, description="Image height and width in pixels, a multiple of 16 (Flow-Factory: 512).")
        guidance_scale: float = Field(
            4.0, ge=0, description="ZImagePipeline's guidance_scale g: v = v_pos + g (v_pos - v_neg), on for g > 0 "
            "(Flow-Factory: 4; Z-Image-Turbo: 0)."
        )
        lora: LoRAConfig = Field(
            default_factory=lambda: LoRAConfig(rank=64, alpha=128.0),
            description="LoRA settings (peft); Flow-Factory's Z-Image default r=64, alpha=128.",
        )
        max_sequence_length: int = Field(512, ge=1, description="Text tokens per prompt (ZImagePipeline's default: 512).")
        text_encoder_device: str | None = Field(
            None, description="Where Qwen3-4B runs, e.g. 'cpu' to keep its ~8 GB (bf16) off the accelerator; None: the policy's device."
        )
        vae_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
            "float32", description="dtype of the VAE's weights and of decoding; None: `dtype` (float32 by default, as Flow-GRPO keeps its VAEs)."
        )

    def __init__(self, config: Config | None = None, components: dict[str, Any] | None = None):
        config = config if config is not None else self.Config()
        dtype = resolve_dtype(config.dtype)
        if components is None:
            components = load_z_image_components(config, dtype)
        components = dict(components)
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        text_device = torch.device(config.text_encoder_device or config.device)
        components["text_encoder"] = components["text_encoder"].to(text_device, dtype)
        components["vae"] = move_module(components["vae"], config.device, vae_dtype(config))  # float32 by default, as the other VAEs
        # The pipeline object only serves encode_prompt; sampling is the toolkit's.
        self.pipeline = ZImagePipeline(
            scheduler=components.pop("scheduler", None) or FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), **components
        )
        factor = self.pipeline.vae_scale_factor
        if config.resolution % (factor * 2):
            raise UserError(f"z-image resolution {config.resolution} must be a multiple of {factor * 2} for the 2x2 patches; use e.g. 512")
        size = config.resolution // factor
        device = torch.device(config.device)
        pipeline = self.pipeline

        def encode(prompts: list[str]) -> Cond:
            embeds, _ = pipeline.encode_prompt(
                prompt=list(prompts), device=text_device, do_classifier_free_guidance=False, max_sequence_length=config.max_sequence_length
            )
            rows = torch.stack(embeds)  # one prompt at a time (PromptCache), so one length
            mask = torch.ones(rows.shape[:2], dtype=torch.long, device=device)
            return Cond(prompt_embeds=rows.to(device, dtype), prompts=list(prompts), extra={MASK: mask})

        transformer = components["transformer"]
        parts = FlowModelParts(
            transformer=transformer,
            encode=encode,
            forward=z_image_forward,
            decode=vae_decoder(components["vae"]),
            latent_shape=(int(transformer.config.in_channels), size, size),
            lora_pipeline=ZImagePipeline,
            frozen_modules=(components["vae"],),
            default_lora_targets=Z_IMAGE_LORA_TARGETS,
            combine_guidance=z_image_guidance,
        )
        super().__init__(parts, config)
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        components["text_encoder"].requires_grad_(False).eval()

    @property
    def guidance_on(self) -> bool:
        """``ZImagePipeline``'s rule: guidance for every ``guidance_scale > 0``."""
        return self.config.guidance_scale > 0

    @classmethod
    def tiny_parts(cls, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Random tiny Z-Image components and the config they fit (:class:`TinyRandomPolicy`)."""
        return tiny_z_image_components(seed), dict(resolution=32, lora={"rank": 4, "alpha": 8.0}, max_sequence_length=32, model=None)


def load_z_image_components(config: ZImagePolicy.Config, dtype: torch.dtype) -> dict[str, Any]:
    """Load the Z-Image components of ``config.model``."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoModel, AutoTokenizer

    model, opts = hub_model(config, "Z-Image")
    return {
        "transformer": hub_load(ZImageTransformer2DModel.from_pretrained, "Z-Image transformer", model, subfolder="transformer", torch_dtype=dtype, **opts),
        "vae": hub_load(AutoencoderKL.from_pretrained, "Z-Image VAE", model, subfolder="vae", torch_dtype=torch.float32, **opts),
        "text_encoder": hub_load(AutoModel.from_pretrained, "Qwen3 text encoder", model, subfolder="text_encoder", dtype=dtype, **opts),
        "tokenizer": hub_load(AutoTokenizer.from_pretrained, "Qwen3 tokenizer", model, subfolder="tokenizer", **opts),
    }


QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The shape of Qwen3's chat template for user turns (``ZImagePipeline`` renders it untokenized)."""


def tiny_z_image_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random Z-Image components (the shapes of diffusers' own Z-Image pipeline tests)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
            axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
        ).eval()
        with torch.no_grad():  # created with torch.empty: fixed, as diffusers' tests fix them
            transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
            transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[8, 8], layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=32,
            scaling_factor=0.3611, shift_factor=0.1159,
        ).eval()
        torch.manual_seed(seed + 2)
        text_encoder = Qwen3Model(Qwen3Config(
            hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=512,
        )).eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }


__all__ = [
    "Z_IMAGE_LORA_TARGETS",
    "ZImagePolicy",
    "load_z_image_components",
    "tiny_z_image_components",
    "z_image_forward",
    "z_image_guidance",
]
