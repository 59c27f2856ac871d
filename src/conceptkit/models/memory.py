"""Memory: the dtype each component is loaded in, and diffusers' CPU offload on a CUDA device.

A half-precision run (float16 / bfloat16) loads every component whose weights are stored in one
half dtype straight in that dtype, so FLUX.1 (stored in bfloat16) never exists in float32 in RAM;
weights stored in float32 (or mixed) still load in float32 and are cast afterwards. Either way the
loaded values are the stored values exactly (an upcast of a half dtype is exact), so the
fingerprint `load.fingerprint_pipeline` takes after loading does not depend on the run's dtype.

`--offload model` is diffusers' `enable_model_cpu_offload()` (each component moved to the GPU for
its forward, the previous one sent back: peak GPU memory about the largest component);
`--offload sequential` is `enable_sequential_cpu_offload()` (every submodule's weights streamed to
the GPU for its forward: least memory, much slower). Both need CUDA; see docs/models.md, "Memory".
"""

from __future__ import annotations

from pathlib import Path

import torch

from conceptkit.errors import UsageError
from conceptkit.tensor_files import FLOATS, BadTensorFile, read_header

OFFLOADS = ("none", "model", "sequential")
HALF = {"F16": torch.float16, "BF16": torch.bfloat16}
COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def stored_dtype(files) -> torch.dtype:
    """The dtype weights stored in safetensors `files` load in exactly: their half dtype if every
    floating tensor has the same one (F16 or BF16), else float32."""
    found = set()
    for path in files:
        try:
            found |= {spec.dtype for spec in read_header(Path(path)).tensors.values() if spec.dtype in FLOATS}
        except (BadTensorFile, OSError):
            return torch.float32  # the loader reports a broken file in its own words
    return HALF[found.pop()] if len(found) == 1 and next(iter(found)) in HALF else torch.float32


def folder_dtypes(folder: Path, variant: str | None, target: torch.dtype) -> dict[str, torch.dtype] | torch.dtype:
    """`torch_dtype` for `from_pretrained` of a pipeline folder: float32 for a float32 run; for a
    half run, each component's stored half dtype (`stored_dtype`), float32 where it has none.

    Args:
        folder: the pipeline folder (model_index.json and one subfolder per component).
        variant: "fp16" when the folder's weights are `*.fp16.safetensors`, else None.
        target: the run's dtype (`resolve_dtype`).
    """
    if target == torch.float32:
        return torch.float32
    dtypes: dict[str, torch.dtype] = {"default": torch.float32}
    for name in COMPONENTS:
        sub = Path(folder) / name
        files = sorted(p for p in sub.glob("*.safetensors") if (variant is None) == (p.name.count(".") == 1))
        if files:
            dtypes[name] = stored_dtype(files)
    return dtypes


def file_dtype(path: Path, target: torch.dtype) -> torch.dtype:
    """The dtype a single file's weights load in for a run in `target`: see `folder_dtypes`."""
    return torch.float32 if target == torch.float32 else stored_dtype([path])


def check_offload(offload: str, device: torch.device) -> str:
    """Refuse an unknown --offload or one on a device that is not CUDA, in one line, before any work."""
    mode = (offload or "none").strip().lower()
    if mode not in OFFLOADS:
        raise UsageError(f"unknown --offload {offload!r}; choose none, model or sequential")
    if mode != "none" and device.type != "cuda":
        raise UsageError(f"--offload needs a CUDA device; this run is on {device.type} (use --offload none, "
                         "or --device cuda on a machine with an NVIDIA GPU)")
    return mode


def apply_offload(pipe, mode: str, device: torch.device) -> None:
    """Switch on diffusers' CPU offload for `pipe` (on the CPU, already cast) executing on `device`."""
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)


def move_and_cast(pipe, device: torch.device, dtype: torch.dtype) -> None:
    """Move every module of `pipe` to `device` and cast it to `dtype`.

    Per module and through `torch.nn.Module.to`: diffusers' `ModelMixin.to` warns about
    fp32-only modules on every dtype cast, even when a model has none.
    """
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        if getattr(component, "_keep_in_fp32_modules", None):
            component.to(device=device, dtype=dtype)
        else:
            torch.nn.Module.to(component, device=device, dtype=dtype)
