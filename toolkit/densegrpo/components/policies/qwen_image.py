"""``qwen-image``: Qwen-Image (20B MMDiT) text-to-image through diffusers' ``QwenImagePipeline``.

Components (diffusers layout): ``transformer`` (``QwenImageTransformer2DModel``, 60 dual-stream
blocks), ``vae`` (``AutoencoderKLQwenImage``, 16 channels, 8x spatial compression, per-channel
``latents_mean`` / ``latents_std``; a video VAE run on one frame), ``text_encoder`` / ``tokenizer``
(Qwen2.5-VL-7B-Instruct, whose last hidden state past the chat template's system prompt is the
prompt encoding).

Behind the Policy protocol latents are the unpacked VAE latents ``(16, H/8, W/8)``; the transformer
sees them packed into 2x2 patches ``(N, H/16 * W/16, 64)``, as ``QwenImagePipeline._pack_latents``
(the same packing as FLUX), with ``img_shapes = [(1, H/16, W/16)]`` for its RoPE. The transformer
takes ``timestep = sigma`` (the pipeline divides its ``1000 * sigma`` timesteps by 1000).

Prompts encode to different lengths (the pipeline keeps only the real tokens): the encoding carries
its mask in ``cond.extra["prompt_embeds_mask"] (N, L)``, and batches are right-padded with zeros
(:func:`densegrpo.components.policies.adapter.cat_rows`), as Flow-GRPO's train_qwenimage.py pads them.

Guidance is Qwen-Image's "true CFG" with a negative prompt (the pipeline's ``true_cfg_scale``):
``v = v_neg + g (v_pos - v_neg)``, then each packed token rescaled to the norm of the conditional
prediction's token (:func:`qwen_image_guidance`), exactly as ``QwenImagePipeline`` and Flow-GRPO's
and Flow-Factory's Qwen-Image trainers do. Qwen2.5-VL-7B is ~8.3B parameters (16.6 GB in bf16):
``text_encoder_device: cpu`` keeps it off the accelerator (each distinct prompt is encoded once and
cached).
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
    classifier_free_guidance,
    hub_load,
    hub_model,
    move_module,
    resolve_dtype,
    vae_dtype,
)
from densegrpo.components.policies.flux import pack_latents, unpack_latents
from densegrpo.components.policies.lora import LoRAConfig
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import Cond

QWEN_IMAGE_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
"""Flow-GRPO's LoRA targets for Qwen-Image (scripts/train_qwenimage.py, ``LoraConfig(r=64,
lora_alpha=128, init_lora_weights="gaussian")``): joint attention of both streams plus both streams'
FFNs. Flow-Factory's ``QwenImageAdapter.default_target_modules``
(src/flow_factory/models/qwen_image/qwen_image.py) lists the same modules but names the FFN output
``img_mlp.net.2.proj``, which does not exist in diffusers' ``FeedForward`` (``net.2`` is the
Linear itself) and which peft therefore skips; this list names the Linear."""

MASK = "prompt_embeds_mask"


def qwen_image_forward(transformer: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
    """One ``QwenImageTransformer2DModel`` call: ``x (N,C,h,w)``, ``sigma (N,)`` -> velocity ``(N,C,h,w)``.

    Packs 2x2 patches, passes the prompt mask ``cond.extra["prompt_embeds_mask"] (N, L)`` and the
    image grid, and unpacks, as ``QwenImagePipeline.__call__``.
    """
    n, _, h, w = x.shape
    out = transformer(
        hidden_states=pack_latents(x),
        timestep=sigma.to(x.dtype),
        guidance=None,
        encoder_hidden_states=cond.prompt_embeds,
        encoder_hidden_states_mask=cond.extra[MASK],
        img_shapes=[[(1, h // 2, w // 2)]] * n,
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)


def qwen_image_guidance(v_negative: Tensor, v_positive: Tensor, scale: float) -> Tensor:
    """Qwen-Image's true CFG: ``v_neg + g (v_pos - v_neg)`` with every packed token (a 2x2 patch of
    all channels) rescaled to the norm of ``v_pos``'s token (``QwenImagePipeline.__call__``:
    ``comb_pred * (cond_norm / noise_norm)``). ``(N,C,h,w)`` float32 in and out."""
    h, w = v_positive.shape[-2:]
    combined = pack_latents(classifier_free_guidance(v_negative, v_positive, scale))
    positive_norm = pack_latents(v_positive).norm(dim=-1, keepdim=True)
    return unpack_latents(combined * (positive_norm / combined.norm(dim=-1, keepdim=True)), h, w)


def qwen_image_decoder(vae: nn.Module) -> Any:
    """``latents (N,C,h,w) -> images (N,3,H,W)`` in [0,1], as ``QwenImagePipeline`` decodes.

    The pipeline un-normalises each channel (``x * latents_std + latents_mean``), decodes one frame
    ``(N,C,1,h,w)`` with the video VAE and keeps frame 0.
    """
    channels = int(vae.config.z_dim)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, channels, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, channels, 1, 1, 1)

    def decode(latents: Tensor) -> Tensor:
        raw = latents.float()[:, :, None] * std.to(latents.device) + mean.to(latents.device)
        image = vae.decode(raw.to(vae.dtype), return_dict=False)[0][:, :, 0]  # (N, 3, H, W) in [-1, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    return decode


class QwenImagePolicy(TinyRandomPolicy, FlowTransformerPolicy):
    """Qwen-Image with LoRA: latent ``(16, H/8, W/8)`` (unpacked), images ``(N, 3, H, W)``.

    ``QwenImagePolicy(config)`` loads ``config.model``; ``QwenImagePolicy(config, components=...)``
    takes already-built modules (keys as in ``QwenImagePipeline``); see :meth:`tiny_random`.
    """

    class Config(DiffusersPolicyConfig):
        """Qwen-Image options (defaults: Flow-GRPO's pickscore_qwenimage in config/grpo.py and scripts/train_qwenimage.py)."""

        model: str | None = Field("Qwen/Qwen-Image", description="Hub id or local folder (Qwen-Image or Qwen-Image-2512, diffusers layout).")
        resolution: int = Field(512, ge=16, description="Image height and width in pixels, a multiple of 16 (Flow-GRPO: 512).")
        guidance_scale: float = Field(
            4.0, ge=0, description="True CFG scale with the negative prompt (QwenImagePipeline's true_cfg_scale); <= 1 disables it (Flow-GRPO: 4)."
        )
        negative_prompt: str = Field(" ", description="Negative prompt for CFG (Flow-GRPO's train_qwenimage.py: a single space).")
        lora: LoRAConfig = Field(
            default_factory=lambda: LoRAConfig(rank=64, alpha=128.0),
            description="LoRA settings (peft); Flow-GRPO's and Flow-Factory's Qwen-Image default r=64, alpha=128.",
        )
        max_sequence_length: int = Field(512, ge=1, le=1024, description="Text tokens per prompt (QwenImagePipeline's default: 512).")
        gradient_checkpointing: bool = Field(
            True, description="Recompute each transformer block in the backward pass instead of storing its activations "
            "(Flow-GRPO's pickscore_qwenimage: activation_checkpointing = True)."
        )
        text_encoder_device: str | None = Field(
            None, description="Where Qwen2.5-VL runs, e.g. 'cpu' to keep its ~16.6 GB (bf16) off the accelerator; None: the policy's device."
        )
        vae_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
            "float32", description="dtype of the VAE's weights and of decoding; None: `dtype` (Flow-GRPO's train_qwenimage.py keeps the Qwen-Image VAE in float32)."
        )

    def __init__(self, config: Config | None = None, components: dict[str, Any] | None = None):
        config = config if config is not None else self.Config()
        dtype = resolve_dtype(config.dtype)
        if components is None:
            components = load_qwen_image_components(config, dtype)
        components = dict(components)
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

        transformer = components["transformer"]
        if transformer.config.guidance_embeds:
            raise UserError("the qwen-image policy trains Qwen-Image without a guidance embedding; this transformer has guidance_embeds")
        text_device = torch.device(config.text_encoder_device or config.device)
        components["text_encoder"] = components["text_encoder"].to(text_device, dtype)
        components["vae"] = move_module(components["vae"], config.device, vae_dtype(config))  # float32 by default, as Flow-GRPO
        # The pipeline object only serves encode_prompt; sampling is the toolkit's.
        self.pipeline = QwenImagePipeline(
            scheduler=components.pop("scheduler", None) or FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), **components
        )
        factor = self.pipeline.vae_scale_factor
        if config.resolution % (factor * 2):
            raise UserError(f"qwen-image resolution {config.resolution} must be a multiple of {factor * 2} for the 2x2 packing; use e.g. 512")
        size = config.resolution // factor
        device = torch.device(config.device)
        pipeline = self.pipeline

        def encode(prompts: list[str]) -> Cond:
            embeds, mask = pipeline.encode_prompt(prompt=prompts, device=text_device, max_sequence_length=config.max_sequence_length)
            if mask is None:  # the pipeline drops an all-ones mask
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            return Cond(prompt_embeds=embeds.to(device, dtype), prompts=list(prompts), extra={MASK: mask.to(device)})

        parts = FlowModelParts(
            transformer=transformer,
            encode=encode,
            forward=qwen_image_forward,
            decode=qwen_image_decoder(components["vae"]),
            latent_shape=(int(transformer.config.in_channels) // 4, size, size),
            lora_pipeline=QwenImagePipeline,
            frozen_modules=(components["vae"],),
            default_lora_targets=QWEN_IMAGE_LORA_TARGETS,
            combine_guidance=qwen_image_guidance,
        )
        super().__init__(parts, config)
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        components["text_encoder"].requires_grad_(False).eval()

    @classmethod
    def tiny_parts(cls, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Random tiny Qwen-Image components and the config they fit (:class:`TinyRandomPolicy`)."""
        return tiny_qwen_image_components(seed), dict(resolution=32, lora={"rank": 4, "alpha": 8.0}, max_sequence_length=1024, model=None)


def load_qwen_image_components(config: QwenImagePolicy.Config, dtype: torch.dtype) -> dict[str, Any]:
    """Load the Qwen-Image components of ``config.model``."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    model, opts = hub_model(config, "Qwen-Image")
    return {
        "transformer": hub_load(QwenImageTransformer2DModel.from_pretrained, "Qwen-Image transformer", model, subfolder="transformer", torch_dtype=dtype, **opts),
        "vae": hub_load(AutoencoderKLQwenImage.from_pretrained, "Qwen-Image VAE", model, subfolder="vae", torch_dtype=torch.float32, **opts),
        "text_encoder": hub_load(Qwen2_5_VLForConditionalGeneration.from_pretrained, "Qwen2.5-VL text encoder", model, subfolder="text_encoder", dtype=dtype, **opts),
        "tokenizer": hub_load(Qwen2Tokenizer.from_pretrained, "Qwen2 tokenizer", model, subfolder="tokenizer", **opts),
    }


QWEN_IMAGE_SYSTEM_PROMPT = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background:"
)
"""The system turn of ``QwenImagePipeline.prompt_template_encode`` (between ``<|im_start|>`` and ``<|im_end|>``)."""


def tiny_qwen_tokenizer():
    """A byte-level Qwen2 tokenizer for tests (the real one is a hub download).

    Vocabulary: the 256 byte symbols (no merges, so a prompt's every byte is a token), the chat
    template's ``<|im_start|>`` / ``<|im_end|>``, ``<|endoftext|>`` as padding, and the template's
    system turn cut into 29 pieces, so that the template's prefix is 34 tokens as with the real
    tokenizer and the pipeline's ``prompt_template_encode_start_idx = 34`` drops exactly that prefix.
    """
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials[1:]], special_tokens=True)
    # prefix = <|im_start|> + 29 system pieces + <|im_end|> + "\n" + <|im_start|> + "user\n" = 34 tokens
    cuts = [len(QWEN_IMAGE_SYSTEM_PROMPT) * i // 29 for i in range(30)]
    pieces = [QWEN_IMAGE_SYSTEM_PROMPT[a:b] for a, b in zip(cuts, cuts[1:])] + ["user\n"]
    tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p in pieces])
    return tokenizer


def tiny_qwen_image_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random Qwen-Image components (the shapes of diffusers' own QwenImage pipeline tests)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        ).eval()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0],
        ).eval()
        torch.manual_seed(seed + 2)
        config = Qwen2_5_VLConfig(
            text_config={
                "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 2, "rope_theta": 1000000.0,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            },
            vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
            hidden_size=16, vocab_size=len(tokenizer), vision_end_token_id=151653, vision_start_token_id=151652,
            vision_token_id=151654,
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }


__all__ = [
    "QWEN_IMAGE_LORA_TARGETS",
    "QwenImagePolicy",
    "load_qwen_image_components",
    "qwen_image_decoder",
    "qwen_image_forward",
    "qwen_image_guidance",
    "tiny_qwen_image_components",
    "tiny_qwen_tokenizer",
]
