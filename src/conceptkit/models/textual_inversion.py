"""Load a learned textual-inversion embedding (Gal et al. 2022) into a loaded SD 1.x/2.x pipeline.

The token is added to the tokenizer and its vector appended to the text encoder's token embedding
table, for this process only; the model's fingerprint is extended with the token and the vector,
so that everything cached with it (harvests, neuron statistics, clusters) is keyed apart from the
plain model. Files are read with safetensors only (a pickled `.bin`/`.pt` is refused). Accepted
layouts: diffusers' `{token: (d,)}` and A1111's `{"emb_params": (1, d)}`, or any file with a
single tensor of shape (d,) or (1, d); and conceptkit's temporal layout `{"vectors": (D, d)}`
(`implant --method temporal`, metadata `method: temporal`): one vector per timestep group, the
table then holding their mean and the model recording the D vectors (`tokens_in_time`), which
conditioning and sampling use step by step (`diffusion`). Multi-token embeddings are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from conceptkit.errors import UsageError

MAX_TEMPORAL_DIM = 16


def read_embedding(path: str | Path, token: str) -> torch.Tensor:
    """The token's vectors in a safetensors file: (d,) for one vector, (D, d) for a temporal one."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"--embedding {path}: not a .safetensors file (pickled .bin/.pt embeddings are refused; convert it)")
    if not path.is_file():
        raise UsageError(f"--embedding {path}: no such file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"--embedding {path}: not a readable safetensors file ({exc})") from None
    if meta.get("method") == "temporal" and "vectors" in tensors:
        vec = tensors["vectors"]
        if vec.ndim != 2 or not 1 <= vec.shape[0] <= MAX_TEMPORAL_DIM or str(vec.shape[0]) != meta.get("temporal_dim"):
            raise UsageError(f"--embedding {path}: a temporal embedding must hold (D, d) vectors, D = its temporal_dim in 1..{MAX_TEMPORAL_DIM}")
    elif token in tensors:
        vec = tensors[token]
    elif "emb_params" in tensors:
        vec = tensors["emb_params"]
    elif len(tensors) == 1:
        vec = next(iter(tensors.values()))
    else:
        raise UsageError(f"--embedding {path}: holds {', '.join(sorted(tensors)[:5])}, none of them {token!r}; pass the right --token")
    if meta.get("method") != "temporal" and vec.ndim == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.ndim != 1 and meta.get("method") != "temporal":
        raise UsageError(f"--embedding {path}: a {tuple(vec.shape)} tensor; only single-vector embeddings (d,) or (1, d) are supported")
    if not torch.isfinite(vec.float()).all():
        raise UsageError(f"--embedding {path}: the vector holds NaN or infinite values")
    return vec


def check_token(token: str | None, embedding: str | Path | None) -> None:
    """--embedding and --token go together; a token is one word."""
    if embedding is None and token is None:
        return
    if embedding is None:
        raise UsageError("--token needs --embedding FILE.safetensors (the learned vector for it)")
    if token is None or not token.strip():
        raise UsageError("--embedding needs --token, the word the prompt uses for it, e.g. --token '<my-concept>'")
    if token != token.strip() or any(ch.isspace() for ch in token):
        raise UsageError(f"--token {token!r} must be one word without spaces")


def check_in_prompts(token: str, prompts: Sequence[str]) -> None:
    missing = [p for p in prompts if token not in p]
    if missing:
        raise UsageError(f"--token {token!r} is not in the prompt {missing[0]!r}; write it in the prompt, e.g. 'a {token}'")


def add_embedding(model, path: str | Path, token: str):
    """A copy of `model` (same pipeline object, modified in place) whose tokenizer knows `token`.

    Args:
        model: a `LoadedModel` (SD 1.x/2.x: one tokenizer and text encoder).
        path: the embedding's safetensors file.
        token: the new word, e.g. "<my-concept>"; it must not be a word the tokenizer already knows.
    """
    check_token(token, path)
    pipe = model.pipe
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise UsageError("--embedding is supported for SD 1.x/2.x models only (SDXL embeddings have two vectors)")
    vec = read_embedding(path, token)
    table = pipe.text_encoder.get_input_embeddings()
    width = table.weight.shape[1]
    if vec.shape[-1] != width:
        raise UsageError(f"--embedding {path}: a vector of width {vec.shape[-1]}, but {model.spec}'s text encoder takes {width}")
    tok = pipe.tokenizer
    if token in tok.get_vocab() or len(tok(token, add_special_tokens=False).input_ids) == 1:
        raise UsageError(f"--token {token!r} is already a word of {model.spec}'s tokenizer; pick a new one, e.g. '<{token.strip('<>')}-ti>'")
    tok.add_tokens([token])
    token_id = tok.convert_tokens_to_ids(token)
    pipe.text_encoder.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[token_id] = (vec if vec.ndim == 1 else vec.float().mean(0)).to(
            table.weight.device, table.weight.dtype)
    model = with_token(model, token, vec)
    if vec.ndim == 2:
        model = dataclasses.replace(model, tokens_in_time=(*model.tokens_in_time, (token_id, vec.float())))
    return model


def with_token(model, token: str, vec: torch.Tensor):
    """`model` with its fingerprint extended by the token and its vector: what it caches is keyed apart."""
    digest = hashlib.sha256(model.fingerprint.encode() + b"\0" + token.encode() + b"\0" + vec.float().numpy().tobytes()).hexdigest()
    return dataclasses.replace(model, fingerprint=digest)
