"""Load a learned textual-inversion embedding (Gal et al. 2022) into a loaded SD 1.x/2.x or SDXL pipeline.

The token is added to the tokenizer and its vector appended to the text encoder's token embedding
table, for this process only; the model's fingerprint is extended with the token and the vector,
so that everything cached with it (harvests, neuron statistics, clusters) is keyed apart from the
plain model. Files are read with safetensors only (a pickled `.bin`/`.pt` is refused). Accepted
layouts: diffusers' `{token: (d,)}` and A1111's `{"emb_params": (1, d)}`, or any file with a
single tensor of shape (d,) or (1, d); and conceptkit's temporal layout `{"vectors": (D, d)}`
(`implant --method temporal`, metadata `method: temporal`): one vector per timestep group, the
table then holding their mean and the model recording the D vectors (`tokens_in_time`), which
conditioning and sampling use step by step (`diffusion`); likewise `method: xti`, one vector per
cross-attention layer. SDXL: A1111's and ComfyUI's `{"clip_l": (1, 768), "clip_g": (1, 1280)}`, or
conceptkit's `{"vectors_l": (D, 768), "vectors_g": (D, 1280)}` for a temporal or xti word (the
model then records both towers' vectors end to end). Multi-token embeddings are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from conceptkit.errors import UsageError

MAX_TEMPORAL_DIM = 16


def _open(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An embedding file's tensors and metadata, read once; a file that is not readable safetensors is refused."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"--embedding {path}: not a .safetensors file (pickled .bin/.pt embeddings are refused; convert it)")
    if not path.is_file():
        raise UsageError(f"--embedding {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"--embedding {path}: not a readable safetensors file ({exc})") from None


def _vector(path, token: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> torch.Tensor:
    """The token's vectors: (d,) for one vector, (D, d) for a temporal one, (G, d) for an xti one."""
    if meta.get("method") in ("temporal", "xti") and "vectors" in tensors:
        vec = tensors["vectors"]
        _check_rows(path, vec, meta)
    elif "vectors_l" in tensors or "clip_l" in tensors:
        raise UsageError(f"--embedding {path}: an SDXL embedding (one vector per text tower); use it with an SDXL model")
    elif token in tensors:
        vec = tensors[token]
    elif "emb_params" in tensors:
        vec = tensors["emb_params"]
    elif len(tensors) == 1:
        vec = next(iter(tensors.values()))
    else:
        raise UsageError(f"--embedding {path}: holds {', '.join(sorted(tensors)[:5])}, none of them {token!r}; pass the right --token")
    in_steps_or_layers = meta.get("method") in ("temporal", "xti")
    if not in_steps_or_layers and vec.ndim == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.ndim != 1 and not in_steps_or_layers:
        raise UsageError(f"--embedding {path}: a {tuple(vec.shape)} tensor; only single-vector embeddings (d,) or (1, d) are supported")
    if not torch.isfinite(vec.float()).all():
        raise UsageError(f"--embedding {path}: the vector holds NaN or infinite values")
    return vec


def _check_rows(path, vec: torch.Tensor, meta: dict[str, str]) -> None:
    """A temporal embedding holds (D, d) vectors, D its temporal_dim; an xti one a vector per layer it names."""
    if meta["method"] == "temporal":
        if vec.ndim != 2 or not 1 <= vec.shape[0] <= MAX_TEMPORAL_DIM or str(vec.shape[0]) != meta.get("temporal_dim"):
            raise UsageError(f"--embedding {path}: a temporal embedding must hold (D, d) vectors, D = its temporal_dim in 1..{MAX_TEMPORAL_DIM}")
    elif vec.ndim != 2 or vec.shape[0] != len(layers_of(path, meta)):
        raise UsageError(f"--embedding {path}: an xti embedding must hold one vector per layer its metadata names")


def read_embedding(path: str | Path, token: str) -> torch.Tensor:
    """The token's vectors in a safetensors file: (d,) for one vector, (D, d) or (G, d) for one in time or in layers."""
    return _vector(path, token, *_open(path))


def _sdxl_vectors(path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """An SDXL embedding's two vectors, (CLIP-L, OpenCLIP-G): A1111's and ComfyUI's `clip_l`/`clip_g` layout,
    or conceptkit's temporal/xti layout `vectors_l`/`vectors_g`, (D or G, d) each."""
    if meta.get("method") in ("temporal", "xti") and "vectors_l" in tensors and "vectors_g" in tensors:
        vl, vg = tensors["vectors_l"], tensors["vectors_g"]
        if vl.ndim != 2 or vg.ndim != 2 or vl.shape[0] != vg.shape[0]:
            raise UsageError(f"--embedding {path}: vectors_l and vectors_g must be (D, d) with the same D")
        _check_rows(path, vl, meta)
        if not (torch.isfinite(vl.float()).all() and torch.isfinite(vg.float()).all()):
            raise UsageError(f"--embedding {path}: the vectors hold NaN or infinite values")
        return vl, vg
    if "vectors" in tensors and meta.get("method") in ("temporal", "xti"):
        raise UsageError(f"--embedding {path}: a {meta['method']} embedding for an SD 1.x/2.x model (one text tower); use it with that model")
    if "clip_l" not in tensors or "clip_g" not in tensors:
        raise UsageError(f"--embedding {path}: an SDXL embedding holds clip_l and clip_g, this one {', '.join(sorted(tensors)[:5])}")
    out = []
    for name in ("clip_l", "clip_g"):
        v = tensors[name]
        v = v[0] if v.ndim == 2 and v.shape[0] == 1 else v
        if v.ndim != 1 or not torch.isfinite(v.float()).all():
            raise UsageError(f"--embedding {path}: {name} must be one finite vector, (d,) or (1, d); got {tuple(tensors[name].shape)}")
        out.append(v)
    return out[0], out[1]


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
        model: a `LoadedModel` (SD 1.x/2.x: one tokenizer and text encoder; SDXL: two, each getting its own vector).
        path: the embedding's safetensors file.
        token: the new word, e.g. "<my-concept>"; it must not be a word the tokenizer already knows.
    """
    check_token(token, path)
    pipe = model.pipe
    tensors, meta = _open(path)
    if getattr(pipe, "text_encoder_2", None) is not None:
        vecs = _sdxl_vectors(path, tensors, meta)
        pairs = [(pipe.tokenizer, pipe.text_encoder, vecs[0]), (pipe.tokenizer_2, pipe.text_encoder_2, vecs[1])]
        vec = torch.cat([v.float() for v in vecs], dim=-1)  # both towers end to end, as conditioning splits them
    else:
        vec = _vector(path, token, tensors, meta)
        pairs = [(pipe.tokenizer, pipe.text_encoder, vec)]
    layers = layers_of(path, meta) if meta.get("method") == "xti" and vec.ndim == 2 else None
    if layers is not None and layers != [n for n, _ in pipe.unet.named_modules() if n.endswith(".attn2")]:
        raise UsageError(f"--embedding {path}: its vectors are for another UNet's cross-attention layers ({len(layers)} of them); "
                         f"use it with the model it was learned on")
    for tok, encoder, v in pairs:
        width = encoder.get_input_embeddings().weight.shape[1]
        if v.shape[-1] != width:
            raise UsageError(f"--embedding {path}: a vector of width {v.shape[-1]}, but {model.spec}'s text encoder takes {width}")
        if token in tok.get_vocab() or len(tok(token, add_special_tokens=False).input_ids) == 1:
            raise UsageError(f"--token {token!r} is already a word of {model.spec}'s tokenizer; pick a new one, e.g. '<{token.strip('<>')}-ti>'")
    for tok, encoder, v in pairs:
        tok.add_tokens([token])
        token_id = tok.convert_tokens_to_ids(token)
        encoder.resize_token_embeddings(len(tok), mean_resizing=False)
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[token_id] = (v if v.ndim == 1 else v.float().mean(0)).to(table.device, table.dtype)
    ids = tuple(tok.convert_tokens_to_ids(token) for tok, _, _ in pairs)
    return knowing(model, token, ids[0] if len(ids) == 1 else ids, vec, in_layers=layers is not None)


def knowing(model, token: str, token_id: int, vec: torch.Tensor, in_layers: bool = False):
    """`model` once its pipeline knows `token`: the fingerprint extended by the vectors, and a word with
    one vector per timestep group or per layer ((D or G, d) `vec`) recorded for conditioning and sampling."""
    model = with_token(model, token, vec)
    if vec.ndim == 2:
        name = "tokens_in_layers" if in_layers else "tokens_in_time"
        model = dataclasses.replace(model, **{name: (*getattr(model, name), (token_id, vec.float()))})
    return model


def temporal_dim_of(path: str | Path, token: str) -> int | None:
    """D of a temporal embedding (`implant --method temporal`); None for any other file."""
    tensors, meta = _open(path)
    if meta.get("method") != "temporal":
        return None
    vec = _sdxl_vectors(path, tensors, meta)[0] if "vectors_l" in tensors else _vector(path, token, tensors, meta)
    return int(vec.shape[0])


def layers_of(path, meta: dict) -> list[str]:
    try:
        layers = json.loads(meta.get("layers", ""))
    except ValueError:
        layers = None
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
        raise UsageError(f"--embedding {path}: an xti embedding names its layers in its metadata (`layers`, a JSON list)")
    return layers


def with_token(model, token: str, vec: torch.Tensor):
    """`model` with its fingerprint extended by the token and its vector: what it caches is keyed apart."""
    digest = hashlib.sha256(model.fingerprint.encode() + b"\0" + token.encode() + b"\0" + vec.float().numpy().tobytes()).hexdigest()
    return dataclasses.replace(model, fingerprint=digest)
