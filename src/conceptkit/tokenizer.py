"""An offline CLIP tokenizer: a byte-level BPE whose merges make each given word one token.

Real CLIP vocabularies cannot be downloaded here, and a tokenizer loaded from a missing hub
repository silently degrades to two tokens. This builds a genuine `CLIPTokenizer` (same
pre-tokenisation, `</w>` word ends, BOS/EOS) over a small vocabulary instead: every listed
word becomes a single token, any other text falls back to single characters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _train_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges, in rank order, learned until every word of `words` is one symbol."""
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(words, trainer)
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]


def build_clip_tokenizer(words: Sequence[str], max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIP BPE tokenizer in which each of `words` is exactly one token.

    Args:
        words: lower-case words made of characters CLIP's pre-tokenizer keeps in one piece.
        max_length: the tokenizer's `model_max_length` (the text encoder's context length).
    """
    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges = _train_merges(sorted({w.lower() for w in words}))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for token in SPECIAL:
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    broken = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if broken:
        raise ValueError(f"words not tokenised as one token: {broken[:5]}")
    return tokenizer
