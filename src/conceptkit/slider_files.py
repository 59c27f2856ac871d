"""Slider files: one slider as a diffusers/peft LoRA safetensors file, and its kohya export.

Keys `unet.<module>.lora_A.weight` (r, in) / `lora_B.weight` (out, r), which
`pipe.load_lora_weights` reads; the header carries diffusers' LoRA config (so alpha comes back),
conceptkit's own entry and the caller's str->str metadata. Kohya files use the
`lora_unet_<module with . -> _>.lora_down/lora_up/alpha` layout that ComfyUI and AUTOMATIC1111 load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conceptkit.errors import UsageError

FORMAT = "conceptkit-slider-lora/1"
CONCEPTKIT_KEY = "conceptkit_slider"  # header entry: JSON {format, rank, alpha, slider_index, modules}
DIFFUSERS_KEY = "lora_adapter_metadata"  # header entry diffusers turns back into a LoraConfig
RESERVED_KEYS = frozenset({"format", CONCEPTKIT_KEY, DIFFUSERS_KEY})


@dataclass(frozen=True)
class SliderFactors:
    """One slider's factors per module: lora_A[name] (r, in), lora_B[name] (out, r)."""

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


def save_slider_file(factors: SliderFactors, path: str | Path, metadata: Mapping[str, str] | None = None,
                     *, slider_index: int | None = None) -> Path:
    """Write one slider as safetensors in diffusers' pipeline LoRA layout.

    Keys `unet.{module}.lora_A.weight` (r, in) / `.lora_B.weight` (out, r), float32. Header:
    `format: pt`; `lora_adapter_metadata`: JSON LoraConfig kwargs with the `unet.` prefix
    (r, lora_alpha, target_modules), from which diffusers restores alpha/r; `conceptkit_slider`:
    JSON {format, rank, alpha, slider_index, modules}; then the caller's str->str entries.
    """
    path = Path(path)
    names = sorted(factors.lora_A)
    lora_config = {"r": factors.rank, "lora_alpha": factors.alpha, "target_modules": names,
                   "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False}
    header = {
        "format": "pt",
        DIFFUSERS_KEY: json.dumps({f"unet.{k}": v for k, v in lora_config.items()}, sort_keys=True),
        CONCEPTKIT_KEY: json.dumps({"format": FORMAT, "rank": factors.rank, "alpha": factors.alpha,
                                    "slider_index": slider_index, "modules": names}),
        **_check_metadata(metadata),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(factors, "unet"), str(path), metadata=header)
    return path


def load_slider_file(path: str | Path) -> LoadedSlider:
    """Read a slider written by `save_slider_file` (or any diffusers/peft LoRA safetensors file
    with `lora_A`/`lora_B` keys, `unet.` prefix optional). Safetensors only, never pickle."""
    from conceptkit.tensor_files import FLOATS, BadTensorFile, read_header

    path = Path(path)
    try:
        checked = read_header(path)  # a pickle or a truncated file is refused before anything is read
    except BadTensorFile as exc:
        raise UsageError(f"cannot read slider file {path}: {exc}") from exc
    odd = [k for k, t in checked.tensors.items() if t.dtype not in FLOATS or len(t.shape) != 2]
    if odd:
        raise UsageError(f"{path}: tensor {odd[0]!r} is not a 2-d float matrix; not a LoRA slider file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises several types for a missing or bad file
        raise UsageError(f"cannot read slider file {path} as safetensors: {exc}") from exc
    lora_a, lora_b = {}, {}
    for key, value in tensors.items():
        name = key.removeprefix("unet.")
        if name.endswith(".lora_A.weight"):
            lora_a[name.removesuffix(".lora_A.weight")] = value.float()
        elif name.endswith(".lora_B.weight"):
            lora_b[name.removesuffix(".lora_B.weight")] = value.float()
        else:
            raise UsageError(f"{path}: unexpected key {key!r}; not a LoRA slider file")
    if not lora_a or set(lora_a) != set(lora_b):
        raise UsageError(f"{path}: lora_A and lora_B keys do not pair up")
    rank = next(iter(lora_a.values())).shape[0]
    if any(a.shape[0] != rank or lora_b[n].shape[1] != rank for n, a in lora_a.items()):
        raise UsageError(f"{path}: the lora_A / lora_B ranks do not agree")
    try:
        ours = json.loads(header.get(CONCEPTKIT_KEY, "{}"))
        config = {k.removeprefix("unet."): v for k, v in json.loads(header.get(DIFFUSERS_KEY, "{}")).items()}
        alpha = float(ours.get("alpha", config.get("lora_alpha", rank)))  # diffusers: no alpha -> r
    except (ValueError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path}: malformed {CONCEPTKIT_KEY} / {DIFFUSERS_KEY} header entry ({exc})") from exc
    if not (alpha > 0 and alpha < float("inf")):
        raise UsageError(f"{path}: LoRA alpha {alpha} is not a positive number")
    factors = SliderFactors(lora_a, lora_b, rank=int(rank), alpha=alpha)
    return LoadedSlider(factors, {k: v for k, v in header.items() if k not in RESERVED_KEYS})


_KOHYA_SPECIAL = {  # SDXL's added-conditioning MLP: diffusers reads only the sgm name back
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def kohya_key(module_name: str) -> str:
    """diffusers module path -> kohya LoRA name: `lora_unet_` + path with `.` -> `_`.

    The inverse of diffusers' `_convert_unet_lora_key` for every linear of the SD1/SD2/SDXL
    UNets (checked in the tests; SDXL's `add_embedding` goes by its sgm name `label_emb`).
    ComfyUI maps both spellings onto its UNet."""
    return "lora_unet_" + _KOHYA_SPECIAL.get(module_name, module_name).replace(".", "_")


def export_kohya(source: str | Path | SliderFactors | Mapping[str, torch.Tensor], out_path: str | Path, *,
                 alpha: float | None = None, metadata: Mapping[str, str] | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write a slider in kohya format for ComfyUI / AUTOMATIC1111.

    Keys `lora_unet_{module_}.lora_down.weight` (r, in) = A, `.lora_up.weight` (out, r) = B,
    `.alpha` () = alpha, so their alpha / r scale matches ours. `source` is one of our files,
    a `SliderFactors`, or a peft state dict (`[unet.]{module}.lora_A.weight` ...) with `alpha`
    (default r, diffusers' rule for a file without alpha).
    """
    meta: dict[str, str] = {}
    if isinstance(source, (str, Path)):
        factors, meta = load_slider_file(source)
    elif isinstance(source, SliderFactors):
        factors = source
    else:
        a = {k.removeprefix("unet.").removesuffix(".lora_A.weight"): v
             for k, v in source.items() if k.endswith(".lora_A.weight")}
        b = {k.removeprefix("unet.").removesuffix(".lora_B.weight"): v
             for k, v in source.items() if k.endswith(".lora_B.weight")}
        if not a or set(a) != set(b) or len(a) + len(b) != len(source):
            raise UsageError("state dict is not a peft LoRA (lora_A/lora_B pairs only)")
        rank = next(iter(a.values())).shape[0]
        factors = SliderFactors(a, b, rank=int(rank), alpha=float(alpha if alpha is not None else rank))
    if alpha is not None and float(alpha) != factors.alpha:
        raise UsageError(f"alpha={alpha} contradicts the slider's own alpha {factors.alpha}")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(factors.lora_A):
        key = kohya_key(name)
        out[f"{key}.lora_down.weight"] = factors.lora_A[name].to(dtype).contiguous()
        out[f"{key}.lora_up.weight"] = factors.lora_B[name].to(dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(factors.alpha, dtype=torch.float32)
    header = {"ss_network_module": "networks.lora", "ss_network_dim": str(factors.rank),
              "ss_network_alpha": str(factors.alpha), **meta, **_check_metadata(metadata)}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_path), metadata=header)
    return out_path
