"""Offline CLIP tokenizers, built from the BPE vocabulary that ships inside open_clip.

Loading ``openai/clip-vit-large-patch14``'s tokenizer from the hub is impossible offline,
and an offline ``from_pretrained`` on a missing folder can silently hand back a tokenizer
with only its special tokens. This module rebuilds CLIP's exact byte-level BPE tokenizer
(49408 tokens: 256 bytes, 256 bytes + ``</w>``, 48894 merges, start/end of text) from
``open_clip/bpe_simple_vocab_16e6.txt.gz`` and asserts the size, so a broken tokenizer
fails loudly instead of producing garbage embeddings.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

from densegrpo.contracts.errors import UserError

CLIP_VOCAB_SIZE = 49408
"""CLIP's vocabulary size (``CLIPTextConfig.vocab_size`` of every released CLIP)."""

CLIP_NUM_MERGES = 49152 - 256 - 2
"""BPE merges CLIP keeps from the open_clip file (as ``open_clip.tokenizer.SimpleTokenizer``)."""

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's ``(vocab, merges)``, read from the BPE file inside the open_clip package.

    Returns:
        vocab: token -> id, ``CLIP_VOCAB_SIZE`` entries, ids ``0 .. 49407``.
        merges: ``CLIP_NUM_MERGES`` pairs in priority order.
    """
    try:
        source = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
        raw = gzip.decompress(source.read_bytes()).decode("utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise UserError(
            "the CLIP BPE vocabulary (open_clip/bpe_simple_vocab_16e6.txt.gz) is missing; "
            "install it with `pip install open_clip_torch`"
        ) from error
    lines = raw.split("\n")[1 : CLIP_NUM_MERGES + 1]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols]
    symbols += ["".join(pair) for pair in merges]
    symbols += [START_OF_TEXT, END_OF_TEXT]
    vocab = {token: index for index, token in enumerate(symbols)}
    if len(vocab) != CLIP_VOCAB_SIZE or len(merges) != CLIP_NUM_MERGES:
        raise UserError(
            f"the open_clip BPE file gave {len(vocab)} tokens and {len(merges)} merges, expected "
            f"{CLIP_VOCAB_SIZE} and {CLIP_NUM_MERGES}; reinstall open_clip_torch"
        )
    return vocab, merges  # type: ignore[return-value]


def clip_tokenizer(model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` identical to OpenAI CLIP's, built offline.

    Args:
        model_max_length: padding/truncation length (77 for released CLIPs; the toy
            policy uses a shorter one).

    Returns:
        A ``CLIPTokenizer`` whose ``len()`` is asserted to be ``CLIP_VOCAB_SIZE``;
        ``pad_token`` is ``<|endoftext|>`` as in SD3's CLIP tokenizers.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=END_OF_TEXT,
        bos_token=START_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=model_max_length,
    )
    check_tokenizer_size(tokenizer, CLIP_VOCAB_SIZE, "CLIP")
    return tokenizer


def check_tokenizer_size(tokenizer, expected: int, what: str = "tokenizer") -> None:
    """Raise if ``tokenizer`` does not hold ``expected`` tokens (e.g. an empty offline load)."""
    size = len(tokenizer)
    if size != expected:
        raise UserError(
            f"the {what} tokenizer has {size} tokens, expected {expected}; it was probably loaded "
            "from an incomplete folder: point the config at a complete local copy"
        )


__all__ = [
    "CLIP_NUM_MERGES",
    "CLIP_VOCAB_SIZE",
    "bytes_to_unicode",
    "check_tokenizer_size",
    "clip_tokenizer",
    "clip_vocab_and_merges",
]
