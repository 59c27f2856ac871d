"""An offline CLIP tokenizer: a byte-level BPE whose merges make each given word one token.

Real CLIP vocabularies cannot be downloaded here, and a tokenizer loaded from a missing hub
repository silently degrades to two tokens. This builds a genuine `CLIPTokenizer` (same
pre-tokenisation, `</w>` word ends, BOS/EOS) over a small vocabulary instead: every listed
word becomes a single token, any other text falls back to single characters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Plain BPE (Sennrich et al. 2016) until every word is one symbol; ties broken by the pair.

    The `tokenizers` trainer breaks ties through randomly seeded hash maps, so its token ids
    differ between processes; this is deterministic.
    """
    byte_char = bytes_to_unicode()
    pieces = [tuple(byte_char[b] for b in w.encode()) for w in words]
    pieces = [w[:-1] + (w[-1] + "</w>",) for w in pieces if len(w) > 1]  # CLIP marks a word's last symbol
    merges: list[tuple[str, str]] = []
    while pieces:
        counts = Counter(pair for w in pieces for pair in zip(w, w[1:]))
        a, b = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append((a, b))
        merged = []
        for w in pieces:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            if len(out) > 1:
                merged.append(tuple(out))
        pieces = merged
    return merges


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
    merges = _learn_merges(sorted({w.lower() for w in words}))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for token in SPECIAL:
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    broken = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if broken:
        raise ValueError(f"words not tokenised as one token: {broken[:5]}")
    return tokenizer


def build_t5_tokenizer(words: Sequence[str], max_length: int = 512):
    """Build a T5 (SentencePiece-style unigram) tokenizer in which each of `words` is one piece.

    Pieces: `<pad>`, `</s>`, `<unk>`, each word with its `▁` word-start mark, then every printable
    ASCII character alone and word-initial; any text tokenises (by characters where it is no word).
    Deterministic: the vocabulary is a sorted list, nothing is trained.

    Args:
        words: lower-case words.
        max_length: the tokenizer's `model_max_length` (what the pipeline pads the T5 prompt to).
    """
    from transformers import T5Tokenizer

    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -2.0}
    for w in sorted({w.lower() for w in words}):
        pieces.setdefault("\u2581" + w, -1.0)
    for c in (chr(i) for i in range(33, 127)):
        pieces.setdefault("\u2581" + c, -4.0)
        pieces.setdefault(c, -5.0)
    tokenizer = T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=max_length)
    broken = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if broken:
        raise ValueError(f"words not tokenised as one piece: {broken[:5]}")
    return tokenizer
