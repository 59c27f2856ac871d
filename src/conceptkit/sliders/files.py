"""Slider files: one slider as a diffusers/peft LoRA safetensors file (its kohya export: `sliders/kohya.py`).

Keys `unet.<module>.lora_A.weight` (r, in) / `lora_B.weight` (out, r), for a conv (r, in, kh, kw) /
(out, r, 1, 1), which `pipe.load_lora_weights` reads; the header carries diffusers' LoRA config,
conceptkit's own entry and the caller's str->str metadata. The LoRA scale alpha/r is folded into
B when writing (the file says alpha = r), so a reader that ignores alpha, or finds none, still gets
the slider's strength. Files of format 1 kept B unscaled and alpha in the header; they load the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conceptkit.errors import UsageError
from conceptkit.tensor_files import BadTensorFile, FLOATS, read_header

FORMAT = "conceptkit-slider-lora/2"  # /1: B unscaled, alpha in the header (still read)
CONCEPTKIT_KEY = "conceptkit_slider"  # header entry: JSON {format, rank, alpha, trained_alpha, slider_index, modules}
DIFFUSERS_KEY = "lora_adapter_metadata"  # header entry diffusers turns back into a LoraConfig
RESERVED_KEYS = frozenset({"format", CONCEPTKIT_KEY, DIFFUSERS_KEY})


@dataclass(frozen=True)
class SliderFactors:
    """One slider's factors per module: lora_A[name] (r, in), lora_B[name] (out, r); for a conv
    (r, in, kh, kw) and (out, r, 1, 1). The slider adds (alpha / rank) * B A."""

    lora_A: dict[str, torch.Tensor]
    lora_B: dict[str, torch.Tensor]
    rank: int
    alpha: float


class LoadedSlider(NamedTuple):
    """What `load_slider_file` returns: the factors and the caller's str->str metadata."""

    factors: SliderFactors
    metadata: dict[str, str]


def peft_state_dict(factors: SliderFactors, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """diffusers/peft keys for one slider: `{prefix}.{module}.lora_A.weight` / `.lora_B.weight`."""
    p = f"{prefix}." if prefix else ""
    out: dict[str, torch.Tensor] = {}
    for name in factors.lora_A:
        out[f"{p}{name}.lora_A.weight"] = factors.lora_A[name].contiguous()
        out[f"{p}{name}.lora_B.weight"] = factors.lora_B[name].contiguous()
    return out


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UsageError(f"slider metadata must map str to str, got {key!r}: {value!r}")
        if key in RESERVED_KEYS:
            raise UsageError(f"slider metadata key {key!r} is reserved")
    return meta


def folded(factors: SliderFactors) -> SliderFactors:
    """The same slider with alpha/r folded into B: B' = B * alpha / r, alpha' = r (scale 1)."""
    scale = factors.alpha / factors.rank
    if scale == 1.0:
        return factors
    return SliderFactors(dict(factors.lora_A), {n: b * scale for n, b in factors.lora_B.items()},
                         rank=factors.rank, alpha=float(factors.rank))


def save_slider_file(factors: SliderFactors, path: str | Path, metadata: Mapping[str, str] | None = None,
                     *, slider_index: int | None = None, prefix: str = "unet") -> Path:
    """Write one slider as safetensors in diffusers' pipeline LoRA layout, its scale folded into B.

    Keys `unet.{module}.lora_A.weight` (r, in) / `.lora_B.weight` (out, r) (conv: (r, in, kh, kw) /
    (out, r, 1, 1)), float32, B already multiplied by alpha/r. Header: `format: pt`;
    `lora_adapter_metadata`: JSON LoraConfig kwargs with the `unet.` prefix (r, lora_alpha = r,
    target_modules); `conceptkit_slider`: JSON {format, rank, alpha (= r), trained_alpha,
    slider_index, modules}; then the caller's str->str entries. `prefix`: `transformer` for FLUX / SD3
    (what `FluxPipeline.load_lora_weights` / `StableDiffusion3Pipeline.load_lora_weights` read).
    """
    path = Path(path)
    check_factors(factors, str(path))
    trained_alpha = factors.alpha
    factors = folded(factors)
    names = sorted(factors.lora_A)
    lora_config = {"r": factors.rank, "lora_alpha": factors.alpha, "target_modules": names,
                   "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False}
    header = {
        "format": "pt",
        DIFFUSERS_KEY: json.dumps({f"{prefix}.{k}": v for k, v in lora_config.items()}, sort_keys=True),
        CONCEPTKIT_KEY: json.dumps({"format": FORMAT, "rank": factors.rank, "alpha": factors.alpha,
                                    "trained_alpha": trained_alpha, "slider_index": slider_index, "modules": names}),
        **_check_metadata(metadata),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(factors, prefix), str(path), metadata=header)
    return path


def load_slider_file(path: str | Path) -> LoadedSlider:
    """Read a slider written by `save_slider_file` (or any diffusers/peft LoRA safetensors file
    with `lora_A`/`lora_B` keys, `unet.` prefix optional). Safetensors only, never pickle."""
    path = Path(path)
    try:
        checked = read_header(path)  # a pickle or a truncated file is refused before anything is read
    except BadTensorFile as exc:
        raise UsageError(f"cannot read slider file {path}: {exc}") from exc
    odd = [k for k, t in checked.tensors.items() if t.dtype not in FLOATS or len(t.shape) not in (2, 4)]
    if odd:
        raise UsageError(f"{path}: tensor {odd[0]!r} is not a 2-d (linear) or 4-d (conv) float tensor; not a LoRA slider file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises several types for a missing or bad file
        raise UsageError(f"cannot read slider file {path} as safetensors: {exc}") from exc
    lora_a, lora_b = {}, {}
    for key, value in tensors.items():
        name = key.removeprefix("unet.").removeprefix("transformer.")
        if name.endswith(".lora_A.weight"):
            lora_a[name.removesuffix(".lora_A.weight")] = value.float()
        elif name.endswith(".lora_B.weight"):
            lora_b[name.removesuffix(".lora_B.weight")] = value.float()
        else:
            raise UsageError(f"{path}: unexpected key {key!r}; not a LoRA slider file")
    if not lora_a or set(lora_a) != set(lora_b):
        raise UsageError(f"{path}: lora_A and lora_B keys do not pair up")
    rank = next(iter(lora_a.values())).shape[0]
    try:
        ours = json.loads(header.get(CONCEPTKIT_KEY, "{}"))
        config = {k.removeprefix("unet.").removeprefix("transformer."): v for k, v in json.loads(header.get(DIFFUSERS_KEY, "{}")).items()}
        alpha = float(ours.get("alpha", config.get("lora_alpha", rank)))  # diffusers: no alpha -> r
    except (ValueError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path}: header entry {CONCEPTKIT_KEY!r} or {DIFFUSERS_KEY!r} is not valid JSON "
                         f"with a numeric alpha: {exc}") from None
    factors = SliderFactors(lora_a, lora_b, rank=int(rank), alpha=alpha)
    check_factors(factors, str(path))
    return LoadedSlider(factors, {k: v for k, v in header.items() if k not in RESERVED_KEYS})


def check_factors(factors: SliderFactors, where: str) -> None:
    """UsageError unless every module has A (r, in[, kh, kw]) and B (out, r[, 1, 1]) of one rank r
    and a finite alpha > 0."""
    r = factors.rank
    if not (r >= 1 and math.isfinite(factors.alpha) and factors.alpha > 0):
        raise UsageError(f"{where}: rank {r} must be >= 1 and alpha {factors.alpha} finite and > 0")
    for name, a in factors.lora_A.items():
        b = factors.lora_B.get(name)
        conv_ok = a.ndim == 4 and b is not None and b.ndim == 4 and tuple(b.shape[2:]) == (1, 1)
        if b is None or not (a.ndim == b.ndim == 2 or conv_ok) or a.shape[0] != r or b.shape[1] != r:
            raise UsageError(f"{where}: {name} has lora_A {tuple(a.shape)} and lora_B "
                             f"{None if b is None else tuple(b.shape)}; want (r, in) / (out, r) or "
                             f"(r, in, kh, kw) / (out, r, 1, 1) with r = {r}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise UsageError(f"{where}: {name} holds NaN or infinite values; the file is damaged")
