"""The offline CLIP tokenizer equals open_clip's reference tokenizer and has CLIP's size."""

from __future__ import annotations

import pytest
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.tokenizers import (
    CLIP_VOCAB_SIZE,
    check_tokenizer_size,
    clip_tokenizer,
)

SENTENCES = [
    "a photo of two red circles left of a blue square",
    "A Photo Of A CAT!  It's   3 dogs, isn't it?",
    "naïve café — Ünïcode and emoji 🙂",
    "a purple triangle above a yellow circle",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer(77)


def test_size_is_clips(tokenizer):
    assert CLIP_VOCAB_SIZE == 49408
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407


@pytest.mark.parametrize("text", SENTENCES)
def test_matches_open_clip_simple_tokenizer(tokenizer, text):
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    expected = [reference.sot_token_id] + reference.encode(text) + [reference.eot_token_id]
    assert tokenizer(text).input_ids == expected


def test_matches_open_clip_padded_batch(tokenizer):
    import open_clip

    expected = open_clip.tokenize(SENTENCES[:4], context_length=77)  # pads with 0, ends with eot
    ids = tokenizer(SENTENCES[:4], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for row, ref in zip(ids.tolist(), expected.tolist()):
        length = ref.index(49407) + 1
        assert row[:length] == ref[:length]
        assert all(t == 49407 for t in row[length:])  # SD3's CLIP-L pads with <|endoftext|>


def test_empty_tokenizer_is_rejected():
    from transformers import CLIPTokenizer

    two_token = CLIPTokenizer()  # what an incomplete offline load can hand back
    assert len(two_token) < 10
    with pytest.raises(UserError, match="49408"):
        check_tokenizer_size(two_token, CLIP_VOCAB_SIZE, "CLIP")
