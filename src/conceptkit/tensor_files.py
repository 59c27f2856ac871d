"""Tensor files from the store or from others, checked from their headers before anything is loaded.

A safetensors file is 8 bytes of little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`, then the data.
`read_header` checks that header against the file's size (a truncated file fails), so shapes and
dtypes can be validated without reading a tensor. Pickles (torch.save, `.bin`, `.ckpt`) are
never loaded: a file that is not safetensors is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOATS = ("F16", "BF16", "F32", "F64")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER = 100_000_000  # safetensors' own limit on the header size


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's entry in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: tensors by name and the str->str metadata."""

    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]


class BadTensorFile(ValueError):
    """The file is not a complete, well-formed safetensors file (the message says why)."""


def _what_it_is(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save's format); pickled weights are never loaded"
    if head[:1] == b"\x80":
        return "a Python pickle; pickled weights are never loaded"
    return "not a safetensors file"


def read_header(path: Path) -> Header:
    """The header of safetensors file `path`, checked against the file's size; `BadTensorFile` if not."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise BadTensorFile(f"{path.name} is {size} bytes: too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise BadTensorFile(f"{path.name} is {_what_it_is(head)}")
            raw = fh.read(n)
    except OSError as exc:
        raise BadTensorFile(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw)
    except ValueError:
        raise BadTensorFile(f"{path.name} is {_what_it_is(head)}") from None
    if not isinstance(doc, dict):
        raise BadTensorFile(f"{path.name}: the header is not an object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BadTensorFile(f"{path.name}: the header metadata is not str -> str")
    tensors, end = {}, 0
    for name, entry in doc.items():
        try:
            dtype, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
            ok = ok and isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise BadTensorFile(f"{path.name}: tensor {name!r} has a malformed header entry")
        if stop - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise BadTensorFile(f"{path.name}: tensor {name!r} claims {stop - begin} bytes for shape {list(shape)} {dtype}")
        tensors[name] = TensorSpec(dtype, shape)
        end = max(end, stop)
    if 8 + n + end > size:
        raise BadTensorFile(f"{path.name} is truncated: {size} bytes, its header describes {8 + n + end}")
    return Header(tensors, meta)


def tensor_problem(path: Path, wanted: dict[str, int]) -> str | None:
    """What is wrong with safetensors file `path` given the tensors it must hold (name -> number of
    dimensions, float), or None when its header is sound."""
    try:
        tensors = read_header(path).tensors
    except BadTensorFile as exc:
        return str(exc)
    for name, dims in wanted.items():
        spec = tensors.get(name)
        if spec is None or len(spec.shape) != dims or spec.dtype not in FLOATS:
            return f"{Path(path).name}: {name} is {'missing' if spec is None else f'{spec.dtype} {list(spec.shape)}'}, expected a {dims}-d float tensor"
    return None


def sha256(path: Path) -> str:
    """The file's sha256, hex."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def pickle_weights(folder: Path) -> list[Path]:
    """Weight files in `folder` that only a pickle loader reads (.bin, .pt, .ckpt, ...)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
