"""``flux2``: FLUX.2-dev (32B) text-to-image through diffusers' ``Flux2Pipeline``.

Components (diffusers layout): ``transformer`` (``Flux2Transformer2DModel``, 8 dual- and 48
single-stream blocks), ``vae`` (``AutoencoderKLFlux2``, 32 channels, 8x spatial compression, with a
batch-norm ``bn`` whose running statistics normalise the patchified latents), ``text_encoder`` /
``tokenizer`` (Mistral-Small-3.1-24B, ``Mistral3ForConditionalGeneration`` and its processor;
the prompt encoding stacks the hidden states of layers ``text_encoder_out_layers``).

Behind the Policy protocol latents are the pipeline's own: the VAE latents patchified 2x2 and
batch-normalised, ``(128, H/16, W/16)``; the transformer sees them flattened to tokens
``(N, H/16 * W/16, 128)`` with 4-axis positional ids ``(t, h, w, l)``, exactly as ``Flux2Pipeline``.
The transformer takes ``timestep = sigma`` (the pipeline divides its ``1000 * sigma`` by 1000).

Guidance: FLUX.2-dev is guidance-distilled. ``guidance_scale`` (the pipeline's, 4.0 by default) is
fed to the transformer's guidance embedding and costs no second pass, as Flow-Factory's FLUX.2
adapter does (src/flow_factory/models/flux/flux2.py); there is no true CFG in ``Flux2Pipeline``, so
the adapter's CFG stays off. A transformer without a guidance embedding (FLUX.2-klein-base) gets
none. Mistral-Small-3.1-24B is ~24B parameters (48 GB in bf16): ``text_encoder_device: cpu`` keeps
it off the accelerator (each distinct prompt is encoded once and cached).
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
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import Cond

FLUX2_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
)
"""Flow-Factory's FLUX.2 LoRA targets (``Flux2Adapter.default_target_modules``,
src/flow_factory/models/flux/flux2.py; r=64, alpha=128 in examples/grpo/lora/flux2/t2i.yaml): the
dual-stream blocks' attention of both streams and both FFNs, and the single-stream blocks' fused
``to_qkv_mlp_proj`` (diffusers' FLUX.2 LoRA tests target it for the same reason). Flow-Factory lists
``attn.to_out.0`` twice; the single blocks' output ``attn.to_out`` is a plain Linear that name does
not reach, so it is left out here too. Flow-GRPO has no FLUX.2 trainer."""


def pack_tokens(latents: Tensor) -> Tensor:
    """``(N, C, h, w)`` -> tokens ``(N, h * w, C)`` (``Flux2Pipeline._pack_latents``)."""
    n, c, h, w = latents.shape
    return latents.reshape(n, c, h * w).permute(0, 2, 1)


def unpack_tokens(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_tokens`: ``(N, h * w, C)`` -> ``(N, C, h, w)``."""
    n, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(n, c, height, width)


def flux2_forward(guidance_scale: float):
    """A forward for :class:`FlowModelParts`: flattens, calls ``Flux2Transformer2DModel``, unflattens."""

    def forward(transformer: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        from diffusers import Flux2Pipeline

        n, _, h, w = x.shape
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((n,), float(guidance_scale), device=x.device, dtype=torch.float32)
        out = transformer(
            hidden_states=pack_tokens(x),
            timestep=sigma.to(x.dtype),
            guidance=guidance,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=Flux2Pipeline._prepare_text_ids(cond.prompt_embeds).to(x.device),  # (N, L, 4)
            img_ids=Flux2Pipeline._prepare_latent_ids(x).to(x.device),  # (N, h * w, 4)
            return_dict=False,
        )[0]
        return unpack_tokens(out, h, w)

    return forward


def flux2_decoder(vae: nn.Module) -> Any:
    """``latents (N, 4C, h, w) -> images (N,3,H,W)`` in [0,1], as ``Flux2Pipeline`` decodes:
    undo the batch norm (``x * sqrt(running_var + eps) + running_mean``), unpatchify 2x2 to
    ``(N, C, 2h, 2w)``, decode."""
    from diffusers import Flux2Pipeline

    def decode(latents: Tensor) -> Tensor:
        mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
        raw = Flux2Pipeline._unpatchify_latents(latents.float() * std + mean)
        images = vae.decode(raw.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    return decode


class Flux2Policy(TinyRandomPolicy, FlowTransformerPolicy):
    """FLUX.2-dev with LoRA: latent ``(128, H/16, W/16)`` (patchified, normalised), images ``(N, 3, H, W)``.

    ``Flux2Policy(config)`` loads ``config.model``; ``Flux2Policy(config, components=...)`` takes
    already-built modules (keys as in ``Flux2Pipeline``); see :meth:`tiny_random`.
    """

    class Config(DiffusersPolicyConfig):
        """FLUX.2 options (defaults: Flow-Factory's examples/grpo/lora/flux2/t2i.yaml)."""

        model: str | None = Field("black-forest-labs/FLUX.2-dev", description="Hub id or local folder (FLUX.2-dev, diffusers layout).")
        resolution: int = Field(512, ge=16, description="Image height and width in pixels, a multiple of 16 (Flow-Factory: 512).")
        guidance_scale: float = Field(
            4.0, ge=0, description="Distilled guidance fed to the transformer's guidance embedding (Flux2Pipeline's guidance_scale; "
            "Flow-Factory: 4); one transformer pass per step, no negative prompt."
        )
        lora: LoRAConfig = Field(
            default_factory=lambda: LoRAConfig(rank=64, alpha=128.0),
            description="LoRA settings (peft); Flow-Factory's FLUX.2 default r=64, alpha=128.",
        )
        max_sequence_length: int = Field(512, ge=1, description="Text tokens per prompt, padded to this length (Flux2Pipeline's default: 512).")
        text_encoder_out_layers: list[int] = Field(
            [10, 20, 30], min_length=1, description="Mistral hidden-state layers stacked into the prompt encoding (Flux2Pipeline's default)."
        )
        gradient_checkpointing: bool = Field(
            False, description="Recompute each transformer block in the backward pass (Flow-Factory's FLUX.2 example: off)."
        )
        text_encoder_device: str | None = Field(
            None, description="Where Mistral-Small-3.1 runs, e.g. 'cpu' to keep its ~48 GB (bf16) off the accelerator; None: the policy's device."
        )
        vae_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
            "float32", description="dtype of the VAE's weights and of decoding; None: `dtype` (float32 by default, as Flow-GRPO keeps its VAEs)."
        )

    def __init__(self, config: Config | None = None, components: dict[str, Any] | None = None):
        config = config if config is not None else self.Config()
        dtype = resolve_dtype(config.dtype)
        if components is None:
            components = load_flux2_components(config, dtype)
        components = dict(components)
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

        text_device = torch.device(config.text_encoder_device or config.device)
        components["text_encoder"] = components["text_encoder"].to(text_device, dtype)
        components["vae"] = move_module(components["vae"], config.device, vae_dtype(config))  # float32 by default, as the other VAEs
        # The pipeline object only serves encode_prompt; sampling is the toolkit's. Its guidance_scale is
        # the embedded one, not the adapter's CFG, so the adapter's CFG is kept off (scale 1).
        self.pipeline = Flux2Pipeline(
            scheduler=components.pop("scheduler", None) or FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), **components
        )
        factor = self.pipeline.vae_scale_factor
        if config.resolution % (factor * 2):
            raise UserError(f"flux2 resolution {config.resolution} must be a multiple of {factor * 2} for the 2x2 patchifying; use e.g. 512")
        size = config.resolution // (factor * 2)
        device = torch.device(config.device)
        pipeline = self.pipeline
        layers = tuple(config.text_encoder_out_layers)

        def encode(prompts: list[str]) -> Cond:
            embeds, _ = pipeline.encode_prompt(
                prompt=prompts, device=text_device, max_sequence_length=config.max_sequence_length, text_encoder_out_layers=layers
            )
            return Cond(prompt_embeds=embeds.to(device, dtype), prompts=list(prompts))

        transformer = components["transformer"]
        parts = FlowModelParts(
            transformer=transformer,
            encode=encode,
            forward=flux2_forward(config.guidance_scale),
            decode=flux2_decoder(components["vae"]),
            latent_shape=(int(transformer.config.in_channels), size, size),
            lora_pipeline=Flux2Pipeline,
            frozen_modules=(components["vae"],),
            default_lora_targets=FLUX2_LORA_TARGETS,
        )
        super().__init__(parts, config)
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        components["text_encoder"].requires_grad_(False).eval()

    @property
    def guidance_on(self) -> bool:
        """Always False: FLUX.2's ``guidance_scale`` is the embedded guidance, never a second (negative) pass."""
        return False

    @classmethod
    def tiny_parts(cls, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Random tiny FLUX.2 components and the config they fit (:class:`TinyRandomPolicy`)."""
        return tiny_flux2_components(seed), dict(resolution=32, lora={"rank": 4, "alpha": 8.0}, max_sequence_length=256, text_encoder_out_layers=[1], model=None)


def load_flux2_components(config: Flux2Policy.Config, dtype: torch.dtype) -> dict[str, Any]:
    """Load the FLUX.2 components of ``config.model``."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import AutoProcessor, Mistral3ForConditionalGeneration

    model, opts = hub_model(config, "FLUX.2-dev")
    return {
        "transformer": hub_load(Flux2Transformer2DModel.from_pretrained, "FLUX.2 transformer", model, subfolder="transformer", torch_dtype=dtype, **opts),
        "vae": hub_load(AutoencoderKLFlux2.from_pretrained, "FLUX.2 VAE", model, subfolder="vae", torch_dtype=torch.float32, **opts),
        "text_encoder": hub_load(Mistral3ForConditionalGeneration.from_pretrained, "Mistral text encoder", model, subfolder="text_encoder", dtype=dtype, **opts),
        "tokenizer": hub_load(AutoProcessor.from_pretrained, "Mistral processor", model, subfolder="tokenizer", **opts),
    }


MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set text = message['content'][0]['text'] %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)
"""The shape of Mistral-Small-3.1's chat template for a system and a user text message."""


def tiny_mistral_tokenizer():
    """A byte-level tokenizer with a Mistral-style chat template, for tests (the real processor is a
    hub download). ``Flux2Pipeline`` calls only its ``apply_chat_template``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    vocab = {token: index for index, token in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def tiny_flux2_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random FLUX.2 components (the shapes of diffusers' own Flux2 pipeline tests)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
    )
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = tiny_mistral_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        ).eval()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLFlux2(
            sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(4, 4), layers_per_block=1,
            latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        ).eval()
        # batch-norm statistics away from (0, 1), so decoding really undoes them
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
        torch.manual_seed(seed + 2)
        config = Mistral3Config(
            text_config={
                "model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 37,
                "max_position_embeddings": 512, "num_attention_heads": 4, "num_hidden_layers": 1, "num_key_value_heads": 2,
                "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0, "sliding_window": None,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
            },
            vision_config={
                "model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
                "intermediate_size": 37, "image_size": 30, "patch_size": 6, "num_channels": 3,
            },
            bos_token_id=1, eos_token_id=2, pad_token_id=3, image_seq_length=4, vision_feature_layer=-1, image_token_index=0,
        )
        text_encoder = Mistral3ForConditionalGeneration(config).eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }


__all__ = [
    "FLUX2_LORA_TARGETS",
    "Flux2Policy",
    "flux2_decoder",
    "flux2_forward",
    "load_flux2_components",
    "pack_tokens",
    "tiny_flux2_components",
    "tiny_mistral_tokenizer",
    "unpack_tokens",
]
