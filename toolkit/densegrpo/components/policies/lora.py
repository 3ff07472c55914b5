"""LoRA on a diffusers transformer through peft, and LoRA files in diffusers' format.

The adapter (:class:`~densegrpo.components.policies.adapter.FlowTransformerPolicy`) adds the adapter with
:func:`add_lora` and reads/writes files with :func:`save_lora_file` / :func:`load_lora_file`:
the format of a pipeline class's ``save_lora_weights`` / ``load_lora_weights``, so a plain
diffusers pipeline can use what training wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from densegrpo.contracts.errors import UserError

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


def check_lora_targets(transformer: nn.Module, targets: list[str]) -> list[str]:
    """``targets`` when each names a module of ``transformer`` (exactly or as a dotted suffix), else a ValueError.

    peft would otherwise skip a misspelt target silently and train fewer layers than asked.
    """
    names = [name for name, _ in transformer.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} do not exist in {type(transformer).__name__}; "
            "fix lora.target_modules (e.g. attn.to_q, attn.add_k_proj)"
        )
    return list(targets)


def add_lora(transformer: nn.Module, lora: LoRAConfig, default_targets: tuple[str, ...]) -> None:
    """Add the peft adapter ``default`` to ``transformer`` (``lora.target_modules`` or ``default_targets``)."""
    from peft import LoraConfig

    targets = check_lora_targets(transformer, list(lora.target_modules or default_targets))
    transformer.add_adapter(
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            init_lora_weights=lora.init if lora.init == "gaussian" else True,
            target_modules=targets,
        )
    )


def save_lora_file(transformer: nn.Module, pipeline: Any, prefix: str, directory: str | Path) -> Path:
    """Write ``transformer``'s adapter as ``directory/pytorch_lora_weights.safetensors`` (float32).

    ``pipeline`` is the diffusers pipeline class whose ``save_lora_weights`` format is written and
    ``prefix`` its name for the denoiser (``transformer`` or ``unet``).
    """
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = {k: v.detach().cpu().float() for k, v in get_peft_model_state_dict(transformer).items()}
    # The adapter metadata carries alpha: without it diffusers would assume alpha = rank.
    metadata = transformer.peft_config["default"].to_dict()
    pipeline.save_lora_weights(
        directory, **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": metadata}, safe_serialization=True
    )
    return directory / "pytorch_lora_weights.safetensors"


def load_lora_file(transformer: nn.Module, pipeline: Any, prefix: str, path: str | Path) -> None:
    """Load a LoRA in ``pipeline``'s format (a folder or a .safetensors file) into ``transformer``'s adapter.

    Weights the adapter lacks raise a ValueError (a file of another rank or other targets).
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    path = Path(path)
    if not path.exists():
        raise UserError(f"LoRA file or folder '{path}' does not exist; pass the folder written by save_lora()")
    state = pipeline.lora_state_dict(str(path))
    if isinstance(state, tuple):
        state = state[0]
    start = prefix + "."
    state = {k[len(start):]: v for k, v in state.items() if k.startswith(start)}
    state = convert_unet_state_dict_to_peft(state)
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(
            f"LoRA file '{path}' has weights this policy lacks (e.g. {unexpected[0]}); "
            "build the policy with the same lora.rank and lora.target_modules"
        )


__all__ = ["FLOW_GRPO_LORA_TARGETS", "LoRAConfig", "add_lora", "check_lora_targets", "load_lora_file", "save_lora_file"]
