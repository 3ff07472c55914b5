"""Compatibility layer: run image-reward 1.5's own model code on today's timm and transformers.

image-reward 1.5 (THUDM, 2023) pins ``timm==0.6.13`` and ``fairscale==0.4.13`` and imports names
that transformers 5 removed. We install it with ``pip install --no-deps image-reward==1.5`` and
execute its *unmodified* source files through this module. Everything here is a shim; nothing
re-implements the scoring:

1. **No package ``__init__``.** ``ImageReward/__init__.py`` imports ``clip`` (OpenAI's, not on
   PyPI), ``datasets`` and its ReFL trainer. We load only the files the scorer needs
   (``ImageReward.py`` and ``models/BLIP/{vit,med,blip,blip_pretrain}.py``) under the private
   alias :data:`ALIAS`, so a real ``import ImageReward`` elsewhere is left untouched.
2. **fairscale** (only ``checkpoint_wrapper``, used for gradient checkpointing, which scoring
   never turns on): when fairscale is missing, a stand-in built on ``torch.utils.checkpoint`` is
   visible in ``sys.modules`` during the import only.
3. **transformers 5** moved ``apply_chunking_to_forward`` / ``prune_linear_layer`` to
   ``transformers.pytorch_utils`` and dropped ``find_pruneable_heads_and_indices``; they are set on
   ``transformers.modeling_utils`` during the import only, then removed again.
4. **transformers 5** dropped ``PreTrainedModel.invert_attention_mask`` and ``get_head_mask``,
   which BLIP's ``BertModel.forward`` calls. We add the transformers-4 versions to the aliased
   ``BertModel`` class (only where missing). Scoring passes an all-ones image mask and no head
   mask, so both are exact.
5. **transformers 5** expects ``post_init()`` (which registers tied-weight keys) where BLIP's
   ``BertModel.__init__`` still calls the 4.x ``init_weights()``; the aliased class gets an
   ``init_weights`` that runs ``post_init()`` first when those keys are missing.
6. **Side effects undone.** ``blip.py`` runs ``warnings.filterwarnings("ignore")`` and
   ``blip_pretrain.py`` sets transformers' log level to ERROR at import; both are restored.
7. **timm 0.6 module paths** (``timm.models.hub``, ``layers``, ``helpers``, ``registry``) still
   import on timm 1.0 (with a FutureWarning we silence); if a later timm removes them they are
   aliased to their private ``_`` successors during the import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from densegrpo_imagereward.errors import ImageRewardNotInstalledError

ALIAS = "_densegrpo_imagereward_upstream"
"""Private package name under which image-reward's files are executed."""

_TIMM_MOVED = {
    "timm.models.hub": "timm.models._hub",
    "timm.models.layers": "timm.layers",
    "timm.models.helpers": "timm.models._helpers",
    "timm.models.registry": "timm.models._registry",
}

_loaded: types.SimpleNamespace | None = None


def upstream_dir() -> Path:
    """Folder of the installed ``ImageReward`` package (found without importing it)."""
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        raise ImageRewardNotInstalledError(
            "the image-reward package is not installed; run "
            "`pip install --no-deps image-reward==1.5` (its pins clash with timm 1.x)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _find_pruneable_heads_and_indices(
    heads: list[int], n_heads: int, head_size: int, already_pruned_heads: set[int]
) -> tuple[set[int], Tensor]:
    """transformers 4.x ``find_pruneable_heads_and_indices`` (removed in 5); pruning only."""
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
        mask[head] = 0
    mask = mask.view(-1).contiguous().eq(1)
    index = torch.arange(len(mask))[mask].long()
    return heads, index


class _CheckpointWrapper(nn.Module):
    """Stand-in for ``fairscale``'s ``checkpoint_wrapper`` (activation checkpointing in training)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(self.module, *args, use_reentrant=False, **kwargs)


def _fairscale_stub() -> dict[str, types.ModuleType]:
    names = [
        "fairscale",
        "fairscale.nn",
        "fairscale.nn.checkpoint",
        "fairscale.nn.checkpoint.checkpoint_activations",
    ]
    modules = {name: types.ModuleType(name) for name in names}
    modules["fairscale.nn.checkpoint.checkpoint_activations"].checkpoint_wrapper = _CheckpointWrapper
    return modules


@contextmanager
def _import_shims() -> Iterator[None]:
    """Shims 2, 3, 6, 7 of the module docstring, active only inside the ``with`` block."""
    added_modules: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("fairscale") is None:
        added_modules.update(_fairscale_stub())
    for old, new in _TIMM_MOVED.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(old)
        except ImportError:
            added_modules[old] = importlib.import_module(new)

    import transformers
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    moved = {
        "apply_chunking_to_forward": getattr(pytorch_utils, "apply_chunking_to_forward", None),
        "prune_linear_layer": getattr(pytorch_utils, "prune_linear_layer", None),
        "find_pruneable_heads_and_indices": _find_pruneable_heads_and_indices,
    }
    added_attrs = [n for n in moved if not hasattr(modeling_utils, n)]
    for name in added_attrs:
        setattr(modeling_utils, name, moved[name])
    for name, module in added_modules.items():
        sys.modules.setdefault(name, module)
    verbosity = transformers.logging.get_verbosity()
    try:
        with warnings.catch_warnings():  # restores blip.py's global filterwarnings("ignore")
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        for name in added_attrs:
            delattr(modeling_utils, name)
        for name, module in added_modules.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def _bare_package(name: str, path: Path) -> types.ModuleType:
    """A package module whose ``__init__.py`` is not executed (shim 1)."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    module.__package__ = name
    sys.modules[name] = module
    return module


def _invert_attention_mask(self: nn.Module, encoder_attention_mask: Tensor) -> Tensor:
    """transformers 4.x ``ModuleUtilsMixin.invert_attention_mask`` (removed in 5)."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    else:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(
    self: nn.Module, head_mask: Tensor | None, num_hidden_layers: int, is_attention_chunked: bool = False
) -> Tensor | list[None]:
    """transformers 4.x ``ModuleUtilsMixin.get_head_mask`` (removed in 5)."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    head_mask = head_mask.to(dtype=self.dtype)
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask


def _init_weights_v4(self: Any) -> None:
    """transformers-4 ``init_weights`` on transformers 5: ``post_init`` first (it calls us back)."""
    from transformers.modeling_utils import PreTrainedModel

    if not hasattr(self, "all_tied_weights_keys"):
        self.post_init()
    else:
        PreTrainedModel.init_weights(self)


def upstream() -> types.SimpleNamespace:
    """image-reward's modules, imported once through the shims.

    Returns a namespace with ``ImageReward`` (the ``ImageReward.ImageReward`` module: the
    ``ImageReward`` model class, ``MLP`` and ``_transform``), ``vit`` (``VisionTransformer``),
    ``med`` (``BertConfig``, ``BertModel``) and ``blip`` (``create_vit``).
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    root = upstream_dir()
    with _import_shims():
        _bare_package(ALIAS, root)
        _bare_package(f"{ALIAS}.models", root / "models")
        vit = importlib.import_module(f"{ALIAS}.models.BLIP.vit")
        med = importlib.import_module(f"{ALIAS}.models.BLIP.med")
        blip = importlib.import_module(f"{ALIAS}.models.BLIP.blip")
        importlib.import_module(f"{ALIAS}.models.BLIP.blip_pretrain")
        image_reward = importlib.import_module(f"{ALIAS}.ImageReward")
    for name, method in (
        ("invert_attention_mask", _invert_attention_mask),
        ("get_head_mask", _get_head_mask),
    ):
        if not hasattr(med.BertModel, name):
            setattr(med.BertModel, name, method)
    from transformers.modeling_utils import PreTrainedModel

    if hasattr(PreTrainedModel, "get_expanded_tied_weights_keys"):  # transformers >= 5
        med.BertPreTrainedModel.init_weights = _init_weights_v4
    _loaded = types.SimpleNamespace(ImageReward=image_reward, vit=vit, med=med, blip=blip)
    return _loaded
