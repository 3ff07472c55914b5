"""One diffusers-backed adapter that turns a flow transformer into a :class:`Policy`.

The toy, SD3/SD3.5 and FLUX.1 policies all run through :class:`FlowTransformerPolicy`:
they differ only in the :class:`FlowModelParts` they hand it (how prompts are encoded,
how the transformer is called, how latents are decoded). Everything GRPO relies on lives
here once:

* prompt encoding with a cache for repeated prompts (text encoders are frozen);
* classifier-free guidance ``v = v_neg + g (v_pos - v_neg)`` with a negative prompt, and
  Flow-GRPO's option to apply it (or not) when velocities are recomputed for the loss;
* LoRA through peft (``transformer.add_adapter``), the reference model being the same
  module with the adapter disabled, and save/load in the format diffusers'
  ``load_lora_weights`` accepts; or full fine-tuning with a frozen copy as reference;
* dtype handling: the transformer may run in bfloat16/float16, but ``velocity`` always
  returns float32 and all step maths stays float32 (method.md section 1).
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from densegrpo.distributed import copy_into, full_tensor
from densegrpo.errors import UserError
from densegrpo.protocols import Cond

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FLOW_GRPO_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
"""Flow-GRPO's LoRA targets for SD3.5 (train_sd3.py): joint attention q/k/v/out of the
image stream and the added-context (text stream) projections."""


class LoRAConfig(BaseModel):
    """LoRA on the transformer through peft (Flow-GRPO: r=32, alpha=64, gaussian init)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(
        True, description="Train a LoRA adapter; False trains every transformer weight (full fine-tuning, doubles memory for the frozen reference copy)."
    )
    rank: int = Field(32, ge=1, description="LoRA rank r (Flow-GRPO / DenseGRPO on SD3.5-M: 32).")
    alpha: float = Field(64.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank (Flow-GRPO: 64).")
    target_modules: list[str] | None = Field(
        None,
        description="Module name suffixes that get LoRA; None: the model's defaults (SD3/FLUX: Flow-GRPO's attention "
        "to_q/to_k/to_v/to_out.0 and add_q/k/v_proj, to_add_out; toy UNet: to_q/to_k/to_v/to_out.0).",
    )
    init: Literal["gaussian", "default"] = Field(
        "gaussian", description="peft init_lora_weights; both start with B = 0 so the adapted model equals the base model (Flow-GRPO: gaussian)."
    )


class FlowPolicyConfig(BaseModel):
    """Fields shared by every diffusers-backed policy."""

    model_config = ConfigDict(extra="forbid")
    device: str = Field("cpu", description="Torch device of the policy, e.g. 'cpu' or 'cuda'.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype of transformer and text encoders; velocities and step maths stay float32."
    )
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA settings (peft).")
    guidance_scale: float = Field(
        4.5, ge=0, description="Classifier-free guidance scale g: v = v_neg + g (v_pos - v_neg); <= 1 disables CFG (paper: 4.5 for SD3.5-M)."
    )
    negative_prompt: str = Field("", description="Negative prompt for CFG (Flow-GRPO: empty string).")
    cfg_during_training: bool = Field(
        True,
        description="Apply CFG also when velocities are recomputed for the loss (with gradients) and for the KL reference, as Flow-GRPO's train.cfg=True; False makes those unguided.",
    )
    model: str | None = Field(None, description="Hugging Face hub id or local folder in diffusers layout.")
    local_files_only: bool = Field(
        True, description="Only read weights already on disk (no network); set False to let diffusers download from the hub."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when downloading.")


@dataclass
class FlowModelParts:
    """What a concrete model hands the adapter.

    Attributes:
        transformer: the diffusers flow transformer (``SD3Transformer2DModel``,
            ``FluxTransformer2DModel``); it gets LoRA and is the only trained module.
        encode: ``prompts -> Cond`` without guidance negatives, no cache, no grad; rows of
            ``prompt_embeds (N, L, D)``, ``pooled_embeds (N, P)`` or ``None`` and ``extra``.
        forward: ``(transformer, x (N,C,h,w) model dtype, sigma (N,) float32, cond) ->
            velocity (N,C,h,w)``; converts sigma to the model's timestep convention and
            packs/unpacks latents where the model needs it.
        decode: clean latents ``(N,C,h,w)`` float32 -> images float32 ``(N,3,H,W)`` in [0,1].
        latent_shape: ``(C, h, w)``.
        lora_pipeline: the diffusers pipeline class whose ``save_lora_weights`` /
            ``load_lora_weights`` format the adapter writes (e.g. ``StableDiffusion3Pipeline``).
        frozen_modules: text encoders, VAE: moved to the device and dtype, frozen.
        lora_prefix: the pipeline's name for the denoiser in LoRA files (``transformer`` for
            SD3/FLUX, ``unet`` for UNet pipelines).
        default_lora_targets: LoRA targets when ``lora.target_modules`` is None.
    """

    transformer: nn.Module
    encode: Callable[[list[str]], Cond]
    forward: Callable[[nn.Module, Tensor, Tensor, Cond], Tensor]
    decode: Callable[[Tensor], Tensor]
    latent_shape: tuple[int, int, int]
    lora_pipeline: Any
    frozen_modules: tuple[nn.Module, ...] = ()
    lora_prefix: str = "transformer"
    default_lora_targets: tuple[str, ...] = tuple(FLOW_GRPO_LORA_TARGETS)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype '{name}' is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def hub_load(loader: Callable[..., Any], what: str, model: str, *, subfolder: str | None, local_files_only: bool, **kwargs: Any) -> Any:
    """``loader(model, subfolder=..., ...)`` with a one-line :class:`UserError` when files are missing.

    With ``local_files_only`` the hub is never contacted (``HF_HUB_OFFLINE=1`` is set for
    the call), so a missing model fails at once instead of hanging on the network.
    """
    previous = os.environ.get("HF_HUB_OFFLINE")
    if local_files_only:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        return loader(model, local_files_only=local_files_only, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        where = f"{model}/{subfolder}" if subfolder else model
        hint = (
            "download it once with `huggingface-cli download` (or set local_files_only: false) and point "
            "`model` at the local folder"
            if local_files_only
            else "check the hub id, your access token and the network, or point `model` at a local folder"
        )
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise UserError(f"cannot load the {what} from '{where}' ({type(error).__name__}: {reason}); {hint}") from error
    finally:
        if local_files_only:
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous


def _cat_conds(rows: list[Cond]) -> Cond:
    def cat(values: list[Tensor | None]) -> Tensor | None:
        return None if values[0] is None else torch.cat(values, dim=0)  # type: ignore[arg-type]

    extra_keys = rows[0].extra.keys()
    return Cond(
        prompt_embeds=cat([r.prompt_embeds for r in rows]),  # type: ignore[arg-type]
        pooled_embeds=cat([r.pooled_embeds for r in rows]),
        prompts=[p for r in rows for p in r.prompts],
        extra={k: torch.cat([r.extra[k] for r in rows], dim=0) for k in extra_keys},
    )


class FlowTransformerPolicy:
    """The :class:`densegrpo.protocols.Policy` implementation shared by all diffusers models.

    Subclasses (``ToyPolicy``, ``SD3Policy``, ``FluxPolicy``) build :class:`FlowModelParts`
    from their Config and call ``super().__init__(parts, config)``.
    """

    Config = FlowPolicyConfig

    def __init__(self, parts: FlowModelParts, config: FlowPolicyConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype)
        self.latent_shape = tuple(int(s) for s in parts.latent_shape)  # type: ignore[assignment]
        self.parts = parts
        self.transformer = _move(parts.transformer, self.device, self.dtype)
        for module in parts.frozen_modules:
            if module is not None:
                module.to(self.device).requires_grad_(False).eval()
        self.transformer.requires_grad_(False)
        self._reference_transformer: nn.Module | None = None
        self._parallel: nn.Module | None = None  # DDP/FSDP wrapper of _TransformerCall, see data_parallel()
        self._in_reference = False
        self._cache: dict[str, Cond] = {}
        lora = config.lora
        if lora.enabled:
            from peft import LoraConfig

            targets = self._matching_targets(list(lora.target_modules or parts.default_lora_targets))
            self.transformer.add_adapter(
                LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    init_lora_weights=lora.init if lora.init == "gaussian" else True,
                    target_modules=targets,
                )
            )
        else:
            self._reference_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
            self.transformer.requires_grad_(True)
        # Trainable weights stay float32 even when the model runs in bf16 (as Flow-GRPO).
        for param in self.trainable_parameters():
            param.data = param.data.float()

    # ----------------------------------------------------------------- set-up helpers
    def _matching_targets(self, targets: list[str]) -> list[str]:
        names = [name for name, _ in self.transformer.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise ValueError(
                f"LoRA target modules {missing} do not exist in {type(self.transformer).__name__}; "
                "fix lora.target_modules (e.g. attn.to_q, attn.add_k_proj)"
            )
        return list(targets)

    # ----------------------------------------------------------------- prompts
    def encode(self, prompts: list[str]) -> Cond:
        """Encode ``N`` prompts -> :class:`Cond` (``prompt_embeds (N,L,D)``, negatives when CFG is on).

        Each distinct prompt is encoded once and cached; text encoders never get gradients.
        """
        if isinstance(prompts, str):
            raise ValueError("encode() takes a list of prompts, not a single string; wrap it in [ ]")
        prompts = list(prompts)
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if self.guidance_on and self.config.negative_prompt not in self._cache:
            todo.append(self.config.negative_prompt)
        if todo:
            with torch.no_grad():
                fresh = self.parts.encode(todo)
            for i, prompt in enumerate(todo):
                self._cache[prompt] = fresh.select([i])
        cond = _cat_conds([self._cache[p] for p in prompts])
        if self.guidance_on:
            negative = _cat_conds([self._cache[self.config.negative_prompt]] * len(prompts))
            cond.negative_prompt_embeds = negative.prompt_embeds
            cond.negative_pooled_embeds = negative.pooled_embeds
            for key, value in negative.extra.items():
                cond.extra["negative_" + key] = value
        return cond

    def clear_cache(self) -> None:
        """Forget cached prompt encodings (after changing text encoders)."""
        self._cache.clear()

    @property
    def guidance_on(self) -> bool:
        return self.config.guidance_scale > 1.0

    # ----------------------------------------------------------------- velocity
    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """``v_theta(x, sigma, c)`` with CFG: ``x (N,C,h,w)``, ``sigma (N,)`` in [0, 1] -> float32 ``(N,C,h,w)``.

        CFG (``guidance_scale > 1``) batches the negative and positive rows in one call,
        ``[negatives; positives]`` as diffusers' pipelines do, and combines them in float32.
        With ``cfg_during_training=False`` a call made with gradients enabled or inside
        :meth:`reference` is unguided (Flow-GRPO's ``train.cfg=False``).
        """
        if x.dim() != 4 or tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"velocity() expects x of shape (N, {', '.join(map(str, self.latent_shape))}), got {tuple(x.shape)}")
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(n)
        if len(cond) != n:
            raise ValueError(f"cond holds {len(cond)} prompts but x holds {n} samples; use cond.select/repeat to match")
        training_call = torch.is_grad_enabled() or self._in_reference
        use_cfg = (
            self.guidance_on
            and cond.negative_prompt_embeds is not None
            and (self.config.cfg_during_training or not training_call)
        )
        x_model = x.to(self.device, self.dtype)
        sigma = sigma.to(self.device)
        if not use_cfg:
            return self._forward(x_model, sigma, self._positive(cond)).float()
        both = Cond(
            prompt_embeds=torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]),  # type: ignore[list-item]
            pooled_embeds=None
            if cond.pooled_embeds is None
            else torch.cat([cond.negative_pooled_embeds, cond.pooled_embeds]),  # type: ignore[list-item]
            prompts=[],
            extra={k: torch.cat([cond.extra["negative_" + k], v]) for k, v in cond.extra.items() if not k.startswith("negative_")},
        )
        out = self._forward(torch.cat([x_model, x_model]), torch.cat([sigma, sigma]), both).float()
        v_negative, v_positive = out.chunk(2)
        return v_negative + self.config.guidance_scale * (v_positive - v_negative)

    def _forward(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """One transformer call: the frozen copy in :meth:`reference` (full fine-tuning), else the
        data-parallel wrapper once :meth:`data_parallel` ran, else the bare transformer."""
        if self._in_reference and self._reference_transformer is not None:
            return self.parts.forward(self._reference_transformer, x, sigma, cond)
        if self._parallel is not None:
            return self._parallel(x, sigma, cond)
        return self.parts.forward(self.transformer, x, sigma, cond)

    def data_parallel(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Run every transformer call through ``wrap(module)`` (DDP or FSDP, see :class:`densegrpo.distributed.DataParallel`).

        ``module`` owns the transformer and its ``forward(x, sigma, cond)`` is ``parts.forward``, so
        model-specific forwards (which read ``transformer.config``) keep the bare model. The frozen
        reference copy of full fine-tuning is not wrapped: every rank keeps it whole.
        """
        self._parallel = wrap(_TransformerCall(self.transformer, self.parts.forward))

    @staticmethod
    def _positive(cond: Cond) -> Cond:
        return Cond(
            prompt_embeds=cond.prompt_embeds,
            pooled_embeds=cond.pooled_embeds,
            prompts=cond.prompts,
            extra={k: v for k, v in cond.extra.items() if not k.startswith("negative_")},
        )

    # ----------------------------------------------------------------- decode
    def decode(self, x0: Tensor) -> Tensor:
        """Clean latents ``(N,C,h,w)`` -> images float32 ``(N,3,H,W)`` in [0, 1] (no grad)."""
        with torch.no_grad():
            images = self.parts.decode(x0.to(self.device))
        return images.float().clamp(0, 1)

    # ----------------------------------------------------------------- training
    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA weights (or every transformer weight for full fine-tuning)."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Trainable weights by their module name (detached CPU copies)."""
        return {n: full_tensor(p.detach()).cpu().clone() for n, p in self.transformer.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore weights saved by :meth:`trainable_state_dict`; unknown or missing names raise."""
        params = {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}
        unknown = sorted(set(state) - set(params))
        missing = sorted(set(params) - set(state))
        if unknown or missing:
            raise ValueError(
                f"checkpoint does not match this policy's trainable weights (unknown: {unknown[:3]}, "
                f"missing: {missing[:3]}); load it into a policy built with the same lora settings"
            )
        for name, value in state.items():
            copy_into(params[name], value)

    @contextmanager
    def reference(self) -> Iterator["FlowTransformerPolicy"]:
        """The frozen base model for the KL term: LoRA disabled (or the frozen copy for full fine-tuning)."""
        if self._in_reference:
            yield self
            return
        self._in_reference = True
        lora = self.config.lora.enabled
        if lora:
            self.transformer.disable_adapters()
        try:
            yield self
        finally:
            if lora:
                self.transformer.enable_adapters()
            self._in_reference = False

    # ----------------------------------------------------------------- LoRA files
    def save_lora(self, directory: str | Path) -> Path:
        """Write the LoRA as ``pytorch_lora_weights.safetensors``, loadable by ``pipe.load_lora_weights(directory)``."""
        if not self.config.lora.enabled:
            raise ValueError("this policy is fully fine-tuned, not LoRA; save trainable_state_dict() instead")
        from peft.utils import get_peft_model_state_dict

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        layers = {k: v.detach().cpu().float() for k, v in get_peft_model_state_dict(self.transformer).items()}
        # The adapter metadata carries alpha: without it diffusers would assume alpha = rank.
        metadata = self.transformer.peft_config["default"].to_dict()
        prefix = self.parts.lora_prefix
        self.parts.lora_pipeline.save_lora_weights(
            directory, **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": metadata}, safe_serialization=True
        )
        return directory / "pytorch_lora_weights.safetensors"

    def load_lora(self, path: str | Path) -> None:
        """Load LoRA weights in diffusers' format (a folder or a .safetensors file) into the adapter."""
        if not self.config.lora.enabled:
            raise ValueError("enable lora in the policy config to load a LoRA file")
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        path = Path(path)
        if not path.exists():
            raise UserError(f"LoRA file or folder '{path}' does not exist; pass the folder written by save_lora()")
        state = self.parts.lora_pipeline.lora_state_dict(str(path))
        if isinstance(state, tuple):
            state = state[0]
        prefix = self.parts.lora_prefix + "."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        state = convert_unet_state_dict_to_peft(state)
        result = set_peft_model_state_dict(self.transformer, state, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise ValueError(
                f"LoRA file '{path}' has weights this policy lacks (e.g. {unexpected[0]}); "
                "build the policy with the same lora.rank and lora.target_modules"
            )


class _TransformerCall(nn.Module):
    """``forward(x, sigma, cond) = call(transformer, x, sigma, cond)``: the module DDP/FSDP wrap."""

    def __init__(self, transformer: nn.Module, call: Callable[[nn.Module, Tensor, Tensor, Cond], Tensor]):
        super().__init__()
        self.transformer = transformer
        self.call = call

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        return self.call(self.transformer, x, sigma, cond)


__all__ = [
    "DTYPES",
    "FLOW_GRPO_LORA_TARGETS",
    "FlowModelParts",
    "FlowPolicyConfig",
    "FlowTransformerPolicy",
    "LoRAConfig",
    "hub_load",
    "resolve_dtype",
]


def _move(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module.to(device, dtype)``, casting only when the dtype changes (diffusers warns on every cast)."""
    current = next(module.parameters()).dtype
    return module.to(device) if current == dtype else module.to(device, dtype)
