"""One diffusers-backed adapter that turns a flow transformer into a :class:`Policy`.

The toy, SD3/SD3.5 and FLUX.1 policies all run through :class:`FlowTransformerPolicy`:
they differ only in the :class:`FlowModelParts` they hand it (how prompts are encoded,
how the transformer is called, how latents are decoded). Everything GRPO relies on lives
here once:

* prompt encoding with a bounded cache for repeated prompts, held in CPU memory, each batch's
  encodings moved to the policy's device when used (:class:`PromptCache`; text encoders are frozen);
* classifier-free guidance ``v = v_neg + g (v_pos - v_neg)`` with a negative prompt
  (:func:`guided_velocity`), and Flow-GRPO's options to apply it (or not) in the loss's
  forward passes, which the loop makes inside :meth:`FlowTransformerPolicy.loss_forward`, and
  to detach the unconditional prediction there (``loss_forward(cfg_grad="conditional")``);
* LoRA through peft (``transformer.add_adapter``), the reference model being the same
  module with the adapter disabled, and save/load in the format diffusers'
  ``load_lora_weights`` accepts (:mod:`densegrpo.components.policies.lora`); or full fine-tuning with
  a frozen copy as reference;
* dtype handling: the transformer may run in bfloat16/float16, but ``velocity`` always
  returns float32 and all step maths stays float32 (method.md section 1); with ``autocast`` every
  transformer call runs under ``torch.autocast`` in that dtype, LoRA included, over float32 master
  weights (Flow-GRPO's mixed precision).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from densegrpo.components.policies.lora import (
    FLOW_GRPO_LORA_TARGETS,
    LoRAConfig,
    add_lora,
    load_lora_file,
    save_lora_file,
)
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import Cond
from densegrpo.contracts.sharding import copy_into, full_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PROMPT_CACHE_SIZE = 1024
"""Default bound of :class:`PromptCache`: SD3.5 with 128 T5 tokens in bf16 encodes a prompt to ~1.7 MB
(``(77 + 128) x 4096`` token embeddings), so ~1.7 GB of CPU memory per process. It holds one rank's
share of the recipes' evaluation set (2048 prompts over 8 ranks: 256) together with the training
prompts of the 60 iterations between evaluations (6 groups per rank each: 360)."""

CFGGrad = Literal["conditional", "both"]
"""Which CFG branches carry gradients in the loss (``train.cfg_grad``)."""

Forward = Callable[[Tensor, Tensor, Cond], Tensor]
"""``(x (N,C,h,w) model dtype, sigma (N,) float32, cond) -> velocity (N,C,h,w)``, one transformer call."""

CombineGuidance = Callable[[Tensor, Tensor, float], Tensor]
"""``(v_neg (N,C,h,w), v_pos (N,C,h,w), scale) -> v (N,C,h,w)`` float32, how a model combines its CFG branches."""


def classifier_free_guidance(v_negative: Tensor, v_positive: Tensor, scale: float) -> Tensor:
    """``v_neg + scale (v_pos - v_neg)`` (Ho & Salimans 2022, eq. 6 in velocity form); every shape, float32."""
    return v_negative + scale * (v_positive - v_negative)


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
        description="Apply CFG also in the loss's forward passes (the log-prob recomputation and the KL reference, made inside "
        "the policy's loss_forward()), as Flow-GRPO's train.cfg=True; False makes those unguided. Which guided branch "
        "carries gradients there is train.cfg_grad.",
    )
    prompt_cache_size: int = Field(
        PROMPT_CACHE_SIZE,
        ge=0,
        description="Most distinct prompts whose encodings the prompt cache keeps, the least recently used dropped first. "
        "The cache lives in CPU memory (SD3.5, 128 T5 tokens, bf16: ~1.7 MB a prompt, ~1.7 GB at 1024) and each batch's "
        "encodings move to `device` when used; a dropped prompt is encoded again, to the same values (every prompt is "
        "encoded alone). 0 keeps none between calls.",
    )
    autocast: bool = Field(
        False,
        description="Run every transformer call under torch.autocast in `dtype`, as Flow-GRPO trains under accelerate's "
        "mixed precision: LoRA layers then compute in bfloat16/float16 (tensor cores) over float32 master weights with "
        "float32 gradients, and autocast's float32 ops (norms, softmax) run in float32. False: each LoRA layer casts its "
        "input to float32 and computes in float32. No effect when `dtype` is float32; with float16 nothing scales the "
        "loss, so prefer bfloat16.",
    )
    model: str | None = Field(None, description="Hugging Face hub id or local folder in diffusers layout.")
    local_files_only: bool = Field(
        True, description="Only read weights already on disk (no network); set False to let diffusers download from the hub."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when downloading.")


class DiffusersPolicyConfig(FlowPolicyConfig):
    """Fields shared by the policies of hub models with a VAE (``sd3``, ``flux``, ``qwen-image``, ``flux2``,
    ``z-image``, ``wan``); each policy applies them itself (:func:`vae_dtype`, ``enable_gradient_checkpointing``)."""

    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each transformer block in the backward pass instead of storing its activations "
        "(diffusers' enable_gradient_checkpointing, non-reentrant): the loss's activation memory shrinks to about one "
        "block's, for about one more forward per backward; values and gradients are unchanged.",
    )
    vae_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="dtype of the VAE's weights and of decoding (latents are cast to it, images come back float32); "
        "None: `dtype`. Flow-GRPO keeps its VAEs in float32.",
    )


def vae_dtype(config: DiffusersPolicyConfig) -> torch.dtype:
    """The VAE's dtype: ``config.vae_dtype``, or the weights' ``config.dtype`` when unset."""
    return resolve_dtype(config.vae_dtype or config.dtype)


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
        latent_shape: ``(C, h, w)``, or ``(C, F, h, w)`` for video models (``F`` latent frames).
        lora_pipeline: the diffusers pipeline class whose ``save_lora_weights`` /
            ``load_lora_weights`` format the adapter writes (e.g. ``StableDiffusion3Pipeline``).
        frozen_modules: text encoders, VAE: moved to the device and dtype, frozen.
        lora_prefix: the pipeline's name for the denoiser in LoRA files (``transformer`` for
            SD3/FLUX, ``unet`` for UNet pipelines).
        default_lora_targets: LoRA targets when ``lora.target_modules`` is None.
        combine_guidance: how the CFG branches combine (:data:`CombineGuidance`); plain
            :func:`classifier_free_guidance` unless the model's pipeline does more (Qwen-Image
            rescales each token to the conditional prediction's norm).
    """

    transformer: nn.Module
    encode: Callable[[list[str]], Cond]
    forward: Callable[[nn.Module, Tensor, Tensor, Cond], Tensor]
    decode: Callable[[Tensor], Tensor]
    latent_shape: tuple[int, ...]
    lora_pipeline: Any
    frozen_modules: tuple[nn.Module, ...] = ()
    lora_prefix: str = "transformer"
    default_lora_targets: tuple[str, ...] = tuple(FLOW_GRPO_LORA_TARGETS)
    combine_guidance: CombineGuidance = classifier_free_guidance


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype '{name}' is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def hub_model(config: Any, family: str) -> tuple[str, dict[str, Any]]:
    """``(model, options)`` for :func:`hub_load` from a diffusers policy's ``config``: its ``model``
    (unset: a one-line :class:`UserError` naming the model ``family``), and ``local_files_only``
    with ``revision`` when one is set."""
    if not config.model:
        raise UserError(f"set policy config `model` to a hub id or a local diffusers folder of {family}")
    options: dict[str, Any] = {"local_files_only": config.local_files_only}
    if config.revision:
        options["revision"] = config.revision
    return config.model, options


def hub_load(loader: Callable[..., Any], what: str, model: str, *, subfolder: str | None, local_files_only: bool, **kwargs: Any) -> Any:
    """``loader(model, subfolder=..., local_files_only=..., ...)`` with a one-line :class:`UserError` when files are missing.

    ``loader`` is a diffusers or transformers ``from_pretrained``: with ``local_files_only`` it
    reads only the local folder or the hub cache, so a missing model fails at once instead of
    waiting on the network. The process environment is left alone.
    """
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    try:
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


def cat_rows(values: list[Tensor]) -> Tensor:
    """Concatenate along the batch; tensors of 2+ dims whose token axis (dim 1) differs are first
    right-padded with zeros to the longest (``(N_i, L_i, ...)`` -> ``(sum N_i, max L_i, ...)``).

    Models whose prompts encode to different lengths (Qwen-Image) carry a mask in ``Cond.extra``
    whose padded positions are then 0, as their pipelines pad a batch.
    """
    if values[0].dim() >= 2 and len({v.shape[1] for v in values}) > 1:
        longest = max(v.shape[1] for v in values)
        values = [torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, longest - v.shape[1])) for v in values]
    return torch.cat(values, dim=0)


def _cat_conds(rows: list[Cond]) -> Cond:
    """Stack conditionings without negatives along the batch: ``N_1 + N_2 + ...`` rows (see :func:`cat_rows`)."""

    def cat(values: list[Tensor | None]) -> Tensor | None:
        return None if values[0] is None else cat_rows(values)  # type: ignore[arg-type]

    extra_keys = rows[0].extra.keys()
    return Cond(
        prompt_embeds=cat([r.prompt_embeds for r in rows]),  # type: ignore[arg-type]
        pooled_embeds=cat([r.pooled_embeds for r in rows]),
        prompts=[p for r in rows for p in r.prompts],
        extra={k: cat_rows([r.extra[k] for r in rows]) for k in extra_keys},
    )


def _cond_to(cond: Cond, device: torch.device) -> Cond:
    """``cond`` (no negative) with every tensor on ``device``; the tensors themselves when already there."""
    return Cond(
        prompt_embeds=cond.prompt_embeds.to(device),
        pooled_embeds=None if cond.pooled_embeds is None else cond.pooled_embeds.to(device),
        prompts=list(cond.prompts),
        extra={k: v.to(device) for k, v in cond.extra.items()},
    )


CPU = torch.device("cpu")


class PromptCache:
    """Encodes each distinct prompt once, keeps the ``max_prompts`` most recently used encodings in CPU
    memory, and hands each batch's encodings over on ``device``.

    The text encoders are frozen, so an encoding never changes. Kept on the accelerator and never
    dropped, the encodings of a large prompt set (PickScore's 25k) would fill it; in CPU memory, an
    LRU of at most ``max_prompts`` prompts bounds the host's share too. A prompt dropped and seen
    again is encoded again, to the same values: each prompt is encoded on its own, in a batch of
    one. A batched encoder's float rounding depends on the batch it runs in (matmul blocking,
    padding), so encoding new prompts together would make a prompt's encoding depend on which other
    prompts were new at the same time, i.e. on the run's history: a resumed run (empty cache) would
    then encode differently from the uninterrupted one and drift from it in the last bits.

    A call uses its distinct prompts in the order they first appear, then its negative prompt (the
    most recently used after the call); a call with more than ``max_prompts`` distinct prompts gets
    them all and keeps the last ``max_prompts`` used. ``len(cache)`` is the number of prompts held,
    :meth:`prompts` their order.
    """

    def __init__(self, encode: Callable[[list[str]], Cond], max_prompts: int = PROMPT_CACHE_SIZE,
                 device: torch.device | str = CPU):
        if max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0, got {max_prompts}")
        self._encode = encode
        self.max_prompts = int(max_prompts)
        self.device = torch.device(device)
        self._rows: OrderedDict[str, Cond] = OrderedDict()  # on the CPU, least recently used first

    def __len__(self) -> int:
        return len(self._rows)

    def prompts(self) -> list[str]:
        """The prompts held, least recently used (next to be dropped) first."""
        return list(self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def __call__(self, prompts: list[str], negative_prompt: str | None = None) -> Cond:
        """``N`` prompts -> :class:`Cond` of ``N`` rows on ``device`` (``prompt_embeds (N, L, D)``,
        ``pooled_embeds (N, P)`` or ``None``, ``extra``); with ``negative_prompt``, ``cond.negative`` is
        that prompt's encoding repeated ``N`` times.

        Only the call's distinct prompts cross to ``device`` (one copy each); the ``N`` rows are
        stacked there.
        """
        wanted = list(dict.fromkeys(prompts))
        if negative_prompt is not None and negative_prompt not in wanted:
            wanted.append(negative_prompt)
        here: dict[str, Cond] = {}
        with torch.no_grad():
            for prompt in wanted:
                row = self._rows.pop(prompt, None)
                if row is None:
                    row = _cond_to(self._encode([prompt]), CPU)
                self._rows[prompt] = row  # (re)inserted last: the most recently used
                here[prompt] = _cond_to(row, self.device)
        while len(self._rows) > self.max_prompts:
            self._rows.popitem(last=False)
        cond = _cat_conds([here[p] for p in prompts])
        if negative_prompt is not None:
            cond.negative = _cat_conds([here[negative_prompt]] * len(prompts))
        return cond


def guided_velocity(forward: Forward, x: Tensor, sigma: Tensor, cond: Cond, scale: float,
                    detach_negative: bool = False, combine: CombineGuidance = classifier_free_guidance) -> Tensor:
    """Classifier-free guidance ``combine(v_neg, v_pos, scale)`` (by default ``v_neg + scale (v_pos - v_neg)``)
    from one transformer call.

    ``x (N,C,h,w)`` in the model's dtype, ``sigma (N,)`` float32 and ``cond`` with
    ``cond.negative`` -> float32 ``(N,C,h,w)``. The batch is ``[negatives; positives]``
    (``2N`` rows), the order of diffusers' pipelines, so velocities match theirs; the
    combination is float32. ``detach_negative``: ``v_neg`` enters as a constant, so gradients
    flow through ``v_pos`` only (Flow-GRPO's ``compute_log_prob`` in train_sd3.py); the value
    is the same.
    """
    negative = cond.negative
    if negative is None:
        raise ValueError("guided_velocity() needs cond.negative; encode with guidance on")
    both = Cond(
        prompt_embeds=cat_rows([negative.prompt_embeds, cond.prompt_embeds]),
        pooled_embeds=None if cond.pooled_embeds is None else torch.cat([negative.pooled_embeds, cond.pooled_embeds]),  # type: ignore[list-item]
        extra={k: cat_rows([negative.extra[k], v]) for k, v in cond.extra.items()},
    )
    out = forward(torch.cat([x, x]), torch.cat([sigma, sigma]), both).float()
    v_negative, v_positive = out.chunk(2)
    if detach_negative:
        v_negative = v_negative.detach()
    return combine(v_negative, v_positive, scale)


class FlowTransformerPolicy:
    """The :class:`densegrpo.contracts.protocols.Policy` implementation shared by all diffusers models.

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
        self.transformer = move_module(parts.transformer, self.device, self.dtype)
        for module in parts.frozen_modules:
            if module is not None:
                module.to(self.device).requires_grad_(False).eval()
        self.transformer.requires_grad_(False)
        self._reference_transformer: nn.Module | None = None
        self._parallel: nn.Module | None = None  # DDP/FSDP wrapper of _TransformerCall, see data_parallel()
        self._in_reference = False
        self._in_loss = False
        self._cfg_grad: CFGGrad = "conditional"
        self._cache = PromptCache(parts.encode, config.prompt_cache_size, self.device)
        if config.lora.enabled:
            add_lora(self.transformer, config.lora, parts.default_lora_targets)
        else:
            self._reference_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
            self.transformer.requires_grad_(True)
        # Trainable weights stay float32 even when the model runs in bf16 (as Flow-GRPO).
        for param in self.trainable_parameters():
            param.data = param.data.float()
        # Skipped in float32, so a float32 policy (the toy ones) computes bit for bit as without the option.
        self._autocast = config.autocast and self.dtype != torch.float32
        if self._autocast and config.lora.enabled:
            disable_lora_input_cast(self.transformer)

    # ----------------------------------------------------------------- prompts
    def encode(self, prompts: list[str]) -> Cond:
        """Encode ``N`` prompts -> :class:`Cond` (``prompt_embeds (N,L,D)``; ``cond.negative`` the
        negative prompt's ``N`` rows when CFG is on).

        The tensors are on the policy's ``device``. Each distinct prompt is encoded once and cached in
        CPU memory, the ``prompt_cache_size`` most recently used kept (:class:`PromptCache`); text
        encoders never get gradients.
        """
        if isinstance(prompts, str):
            raise ValueError("encode() takes a list of prompts, not a single string; wrap it in [ ]")
        return self._cache(list(prompts), self.config.negative_prompt if self.guidance_on else None)

    def clear_cache(self) -> None:
        """Forget cached prompt encodings (after changing text encoders)."""
        self._cache.clear()

    @property
    def guidance_on(self) -> bool:
        return self.config.guidance_scale > 1.0

    # ----------------------------------------------------------------- velocity
    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """``v_theta(x, sigma, c)`` with CFG: ``x (N, *latent_shape)`` (``(N,C,h,w)``, or ``(N,C,F,h,w)`` for video),
        ``sigma (N,)`` in [0, 1] -> float32 velocity of ``x``'s shape.

        CFG applies when ``guidance_scale > 1`` and ``cond.negative`` is present (see
        :func:`guided_velocity`), except inside :meth:`loss_forward` with
        ``cfg_during_training=False`` (Flow-GRPO's ``train.cfg=False``); inside
        ``loss_forward(cfg_grad="conditional")`` the unconditional branch is detached. Gradient
        mode plays no part.
        """
        if tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"velocity() expects x of shape (N, {', '.join(map(str, self.latent_shape))}), got {tuple(x.shape)}")
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(n)
        if len(cond) != n:
            raise ValueError(f"cond holds {len(cond)} prompts but x holds {n} samples; use cond.select/repeat to match")
        x_model = x.to(self.device, self.dtype)
        sigma = sigma.to(self.device)
        if not self._guided(cond):
            return self._forward(x_model, sigma, replace(cond, negative=None)).float()
        detach = self._in_loss and self._cfg_grad == "conditional"
        return guided_velocity(self._forward, x_model, sigma, cond, self.config.guidance_scale, detach_negative=detach,
                               combine=self.parts.combine_guidance)

    def _guided(self, cond: Cond) -> bool:
        if not self.guidance_on or cond.negative is None:
            return False
        return self.config.cfg_during_training or not self._in_loss

    @contextmanager
    def loss_forward(self, cfg_grad: CFGGrad = "conditional") -> Iterator[None]:
        """Context of the GRPO loss's forward passes (the log-prob recomputation and the KL
        reference pass): with ``cfg_during_training=False`` every :meth:`velocity` inside is
        unguided; with guidance, ``cfg_grad="conditional"`` detaches ``v_neg`` (gradients through
        ``v_pos`` only, as Flow-GRPO) and ``"both"`` keeps it attached."""
        if cfg_grad not in ("conditional", "both"):
            raise ValueError(f"cfg_grad must be 'conditional' or 'both', got {cfg_grad!r}")
        outer = self._in_loss, self._cfg_grad
        self._in_loss, self._cfg_grad = True, cfg_grad
        try:
            yield
        finally:
            self._in_loss, self._cfg_grad = outer

    def _forward(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """One transformer call: the frozen copy in :meth:`reference` (full fine-tuning), else the
        data-parallel wrapper once :meth:`data_parallel` ran, else the bare transformer; under
        ``torch.autocast`` in the weights' dtype with ``autocast`` (the output is then in that dtype;
        callers upcast)."""
        with self._precision():
            if self._in_reference and self._reference_transformer is not None:
                return self.parts.forward(self._reference_transformer, x, sigma, cond)
            if self._parallel is not None:
                return self._parallel(x, sigma, cond)
            return self.parts.forward(self.transformer, x, sigma, cond)

    def _precision(self) -> Any:
        """``torch.autocast(device type, dtype)`` with ``autocast`` (and a non-float32 ``dtype``), else a no-op context.

        Every transformer call, with or without gradients, goes through it, as every call of Flow-GRPO's
        transformer does (accelerate's ``prepare`` runs its forward under autocast, sampling included).
        Gradient checkpointing's recomputation restores the autocast state of the forward it repeats
        (``torch.utils.checkpoint``, non-reentrant).
        """
        if not self._autocast:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def data_parallel(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Run every transformer call through ``wrap(module)`` (DDP or FSDP, see :class:`densegrpo.method.distributed.DataParallel`).

        ``module`` owns the transformer and its ``forward(x, sigma, cond)`` is ``parts.forward``, so
        model-specific forwards (which read ``transformer.config``) keep the bare model. The frozen
        reference copy of full fine-tuning is not wrapped: every rank keeps it whole.
        """
        self._parallel = wrap(_TransformerCall(self.transformer, self.parts.forward))

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
        """The frozen base model for the KL term: LoRA disabled (or the frozen copy for full fine-tuning).

        Guidance inside follows :meth:`velocity`'s rule: the loss's reference pass is made inside
        :meth:`loss_forward` as well, and only there does ``cfg_during_training=False`` drop CFG.
        """
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
        return save_lora_file(self.transformer, self.parts.lora_pipeline, self.parts.lora_prefix, directory)

    def load_lora(self, path: str | Path) -> None:
        """Load LoRA weights in diffusers' format (a folder or a .safetensors file) into the adapter."""
        if not self.config.lora.enabled:
            raise ValueError("enable lora in the policy config to load a LoRA file")
        load_lora_file(self.transformer, self.parts.lora_pipeline, self.parts.lora_prefix, path)


class _TransformerCall(nn.Module):
    """``forward(x, sigma, cond) = call(transformer, x, sigma, cond)``: the module DDP/FSDP wrap."""

    def __init__(self, transformer: nn.Module, call: Callable[[nn.Module, Tensor, Tensor, Cond], Tensor]):
        super().__init__()
        self.transformer = transformer
        self.call = call

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        return self.call(self.transformer, x, sigma, cond)


class TinyRandomPolicy:
    """``tiny_random()`` and ``contract_instance()`` for a diffusers policy built as
    ``cls(config, components=...)`` whose class gives :meth:`tiny_parts`: random tiny components
    made in code and the config they fit, for tests, smoke runs and the registry-wide contract test
    (no weights offline)."""

    @classmethod
    def tiny_parts(cls, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(components, config defaults)`` of a tiny random instance drawn with ``seed``."""
        raise NotImplementedError(f"{cls.__name__} defines no tiny_parts()")

    @classmethod
    def tiny_random(cls, seed: int = 0, config: Any = None, **overrides: Any) -> Any:
        """A seconds-fast instance of random tiny components: ``config`` as given, or the tiny
        defaults of :meth:`tiny_parts` with ``overrides`` on top."""
        components, defaults = cls.tiny_parts(seed)
        return cls(config if config is not None else cls.Config(**{**defaults, **overrides}), components=components)

    @classmethod
    def contract_instance(cls) -> Any:
        """The tiny instance the registry-wide contract tests build."""
        return cls.tiny_random(seed=0)


def disable_lora_input_cast(transformer: nn.Module) -> None:
    """Stop peft's LoRA layers from casting their input to the LoRA weights' dtype (float32).

    Under autocast the cast is a lossless round trip (bf16 -> fp32, then autocast's fp32 -> bf16 for
    the matmul) that only costs time and a transient float32 copy of each LoRA layer's input. It is
    switched off once for good rather than per call (``peft.helpers.disable_input_dtype_casting``):
    every call of the policy's transformer runs under autocast, and the once-off switch also holds
    in gradient checkpointing's recomputation.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def move_module(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """``module.to(device, dtype)``, casting only when the dtype changes (diffusers warns on every cast)."""
    current = next(module.parameters()).dtype
    return module.to(device) if current == dtype else module.to(device, dtype)


__all__ = [
    "DTYPES",
    "CombineGuidance",
    "DiffusersPolicyConfig",
    "FLOW_GRPO_LORA_TARGETS",
    "FlowModelParts",
    "FlowPolicyConfig",
    "PROMPT_CACHE_SIZE",
    "FlowTransformerPolicy",
    "LoRAConfig",
    "PromptCache",
    "TinyRandomPolicy",
    "cat_rows",
    "classifier_free_guidance",
    "guided_velocity",
    "hub_load",
    "move_module",
    "resolve_dtype",
    "vae_dtype",
]
