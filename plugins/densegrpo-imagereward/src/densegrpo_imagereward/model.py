"""Build image-reward's own ``ImageReward`` module: from a checkpoint, or tiny and random for tests."""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from densegrpo.api import hub_reachable, load_state_dict
from torch import nn

from densegrpo_imagereward.compat import ALIAS, upstream
from densegrpo_imagereward.errors import MissingWeightsError
from densegrpo_imagereward.weights import resolve_file

HUB_REPO = "THUDM/ImageReward"
TOKENIZER_REPO = "bert-base-uncased"
CHECKPOINT_NAMES = ("ImageReward.safetensors", "ImageReward.pt")
WEIGHTS_HINT = (
    "set model_path to a folder holding ImageReward.pt and med_config.json (from the hub repo "
    f"{HUB_REPO}), or run `huggingface-cli download {HUB_REPO}` on a connected machine"
)
TOKENIZER_HINT = (
    "set tokenizer_path to a folder holding bert-base-uncased's vocab.txt, or run "
    f"`huggingface-cli download {TOKENIZER_REPO}` on a connected machine"
)


@contextmanager
def _patched(module: Any, **attrs: Any) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """BLIP's ``init_tokenizer`` on a loaded BERT tokenizer: add ``[DEC]`` (bos) and ``[ENC]``.

    Upstream reads ``additional_special_tokens_ids``, which transformers 5 removed; the token ids
    are the same. Neither token occurs in prompt encodings, so scores do not depend on them.
    """
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def load_tokenizer(tokenizer_path: str) -> Any:
    """The BERT tokenizer ImageReward uses (``bert-base-uncased``), from a folder or the hub cache."""
    from transformers import BertTokenizer

    local = Path(tokenizer_path).expanduser()
    attempts = [(str(local), True)] if local.exists() else [(tokenizer_path, True)]
    if not local.exists() and hub_reachable():
        attempts.append((tokenizer_path, False))
    for path, local_only in attempts:
        try:
            tokenizer = BertTokenizer.from_pretrained(path, local_files_only=local_only)
        except (OSError, ValueError):
            continue
        if len(tokenizer) < 32:  # an offline "load" can silently return a specials-only vocab
            continue
        return prepare_tokenizer(tokenizer)
    raise MissingWeightsError(f"ImageReward tokenizer {tokenizer_path!r} was not found offline; {TOKENIZER_HINT}")


def build_upstream(
    med_config: str | Path,
    tokenizer: Any,
    device: str = "cpu",
    create_vit: Any | None = None,
) -> nn.Module:
    """``ImageReward.ImageReward(med_config, device)`` from image-reward, with our tokenizer.

    ``create_vit`` replaces BLIP's ``create_vit(vit, image_size, ...)`` (tests pass a tiny ViT).
    """
    up = upstream()
    blip_pretrain = sys.modules[f"{ALIAS}.models.BLIP.blip_pretrain"]
    patches: dict[str, Any] = {"init_tokenizer": lambda: tokenizer}
    if create_vit is not None:
        patches["create_vit"] = create_vit
    with _patched(blip_pretrain, **patches):
        model = up.ImageReward.ImageReward(med_config=str(med_config), device=device)
    return model.eval()


def load_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """ImageReward's state dict: safetensors if given, else ``torch.load(weights_only=True)``.

    THUDM publishes only ``ImageReward.pt``, a pickled plain state dict; ``weights_only=True``
    unpickles tensors and containers only, never arbitrary objects.
    """
    return load_state_dict(
        path, fix="ImageReward checkpoints must be plain state dicts; convert it to safetensors", error=MissingWeightsError
    )


def load_pretrained(model_path: str, tokenizer_path: str, create_vit: Any | None = None) -> nn.Module:
    """The released ImageReward-v1.0 from a hub repo id or a local folder/file.

    ``create_vit`` is for tests only (a tiny ViT instead of upstream's hard-coded ViT-L).
    """
    local = Path(model_path).expanduser()
    if local.is_file():
        checkpoint = local
        med_config = resolve_file(str(local.parent), "med_config.json", "ImageReward config", WEIGHTS_HINT)
    else:
        checkpoint = None
        if local.is_dir():
            for name in CHECKPOINT_NAMES:
                if (local / name).is_file():
                    checkpoint = local / name
                    break
        checkpoint = checkpoint or resolve_file(model_path, "ImageReward.pt", "ImageReward weights", WEIGHTS_HINT)
        med_config = resolve_file(model_path, "med_config.json", "ImageReward config", WEIGHTS_HINT)
    tokenizer = load_tokenizer(tokenizer_path)
    state = load_checkpoint_state(Path(checkpoint))
    model = build_upstream(med_config, tokenizer, device="cpu", create_vit=create_vit)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise MissingWeightsError(
            f"ImageReward checkpoint {checkpoint} lacks {len(missing)} weights (first: {missing[0]}); "
            f"use ImageReward-v1.0 from {HUB_REPO}"
        )
    return model


# ---------------------------------------------------------------- tiny random model (tests, contract)

TINY_WORDS = (
    "a an the of on in with and photo picture image sign says open closed cat dog red blue green "
    "yellow black white car tree house person two three big small"
).split()


def tiny_tokenizer() -> Any:
    """A BERT word-piece tokenizer over a small in-code vocabulary (no hub access)."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + TINY_WORDS + letters + ['"', "."]))}
    return prepare_tokenizer(BertTokenizer(vocab=vocab))


def tiny_vit_builder(vision_width: int = 32) -> Any:
    """A stand-in for BLIP's ``create_vit`` that builds upstream's ``VisionTransformer`` with 1 block."""
    up = upstream()

    def create_tiny_vit(vit: str, image_size: int, *args: Any, **kwargs: Any) -> tuple[nn.Module, int]:
        encoder = up.vit.VisionTransformer(
            img_size=image_size, patch_size=16, embed_dim=vision_width, depth=1, num_heads=2
        )
        return encoder, vision_width

    return create_tiny_vit


def tiny_med_config(vocab_size: int, vision_width: int = 32, text_layers: int = 1) -> dict[str, Any]:
    """A BLIP ``med_config.json`` with 1 small BERT layer (the width stays 768 for ``MLP(768)``)."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": text_layers,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": vision_width,
        "add_cross_attention": True,
    }


def tiny_upstream(seed: int = 0, vision_width: int = 32) -> nn.Module:
    """image-reward's ``ImageReward`` with a tiny random BLIP (ViT 1 block, BERT 1 layer).

    The text width stays 768 because upstream hard-codes ``MLP(768)``; the intermediate size and
    vocabulary are tiny. Construction runs upstream's own ``ImageReward.__init__``.
    """
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "med_config.json"
        config_path.write_text(json.dumps(tiny_med_config(len(tokenizer), vision_width)))
        model = build_upstream(config_path, tokenizer, create_vit=tiny_vit_builder(vision_width))
    # upstream's MLP init (std 1/769, zero bias) gives near-constant scores; torch's default
    # Linear init keeps them O(1) and varied, so a mix-up of pairs cannot pass unnoticed
    torch.manual_seed(seed + 1)
    for layer in model.mlp.layers:
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()
    return model
