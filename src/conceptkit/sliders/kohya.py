"""The kohya export of a slider: one file that ComfyUI, AUTOMATIC1111, Forge, diffusers and kohya sd-scripts load.

Keys `lora_unet_{name}.lora_down.weight` (r, in[, kh, kw]), `.lora_up.weight` (out, r[, 1, 1]) and
`.alpha` (), with `name` the module path with `.` -> `_`: diffusers' paths for SD 1.x / 2.x (what
kohya's own SD 1.x UNet uses), the original LDM paths for SDXL (`input_blocks_4_1_...`, what
sd-scripts' SDXL UNet uses; `ldm_names.py`). The header carries what kohya writes (`ss_*`) and
modelspec 1.0 (`modelspec.*`), so AUTOMATIC1111 files an SDXL slider under SDXL. FLUX.1 sliders take
Black Forest Labs' module names, fused q/k/v layers included (`kohya_flux.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from conceptkit.errors import UsageError
from conceptkit.models.ldm_names import ldm_module_name
from conceptkit.sliders.files import SliderFactors, _check_metadata, check_factors, load_slider_file
from conceptkit.sliders.kohya_flux import flux_tensors


@dataclass(frozen=True)
class KohyaArch:
    """How one base architecture is named and labelled in a kohya file."""

    base_model_version: str  # ss_base_model_version, as sd-scripts writes it
    modelspec_architecture: str  # modelspec.architecture of a LoRA for it
    implementation: str  # modelspec.implementation: the code whose module names the keys use
    ldm_names: bool  # keys in LDM naming (SDXL) rather than diffusers naming


ARCHS = {
    "sd1": KohyaArch("sd_v1", "stable-diffusion-v1/lora", "diffusers", False),
    "sd2": KohyaArch("sd_v2", "stable-diffusion-v2-512/lora", "diffusers", False),
    "sdxl": KohyaArch("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora",
                      "https://github.com/Stability-AI/generative-models", True),
    "flux": KohyaArch("flux1", "flux-1-dev/lora", "https://github.com/black-forest-labs/flux", True),  # kohya_flux.py
}
_SD1_SPECIAL = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# modules outside the resnet / transformer / down- and upsampler blocks, which sd-scripts' networks never wrap
_SD_SCRIPTS_NEVER = re.compile(r"(time_embedding|add_embedding|class_embedding)\..*|conv_in|conv_out")


def _arch(arch: str) -> KohyaArch:
    if arch not in ARCHS:
        raise UsageError(f"base model architecture {arch!r} has no kohya naming; allowed: {', '.join(ARCHS)}")
    return ARCHS[arch]


def kohya_key(module_name: str, arch: str = "sd1") -> str:
    """diffusers module path -> kohya LoRA name: `lora_unet_` + path with `.` -> `_`.

    SD 1.x / 2.x keep diffusers' path (the inverse of diffusers' `_convert_unet_lora_key`; an
    `add_embedding` goes by its sgm name `label_emb`); SDXL uses the LDM path
    (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k` -> `input_blocks.4.1...`)."""
    if arch == "flux":
        raise UsageError("architecture 'flux' fuses layers (q, k, v in one qkv): its keys come from kohya_flux.flux_tensors")
    name = ldm_module_name(module_name) if _arch(arch).ldm_names else _SD1_SPECIAL.get(module_name, module_name)
    return "lora_unet_" + name.replace(".", "_")


def sd_scripts_skips(module_names) -> list[str]:
    """The modules kohya sd-scripts never loads from a LoRA file (time and added embeddings,
    conv_in, conv_out): its networks wrap only layers inside resnets, transformers and samplers."""
    return sorted(n for n in module_names if _SD_SCRIPTS_NEVER.fullmatch(n))


def kohya_header(factors: SliderFactors, arch: str, *, title: str, description: str) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` header entries of a kohya file for `factors` on `arch`."""
    info = _arch(arch)
    alpha = str(float(factors.alpha))
    header = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(factors.rank), "ss_network_alpha": alpha,
        "ss_base_model_version": info.base_model_version, "ss_v2": str(arch == "sd2"),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": info.modelspec_architecture,
        "modelspec.implementation": info.implementation, "modelspec.title": title,
        "modelspec.description": description,
    }
    if any(a.ndim == 4 and tuple(a.shape[2:]) != (1, 1) for a in factors.lora_A.values()):
        header["ss_network_args"] = f'{{"conv_dim": "{factors.rank}", "conv_alpha": "{alpha}"}}'  # LoCon, as kohya writes it
    return header


def export_kohya(source: str | Path | SliderFactors | Mapping[str, torch.Tensor], out_path: str | Path, *,
                 arch: str | None = None, alpha: float | None = None, metadata: Mapping[str, str] | None = None,
                 dtype: torch.dtype = torch.float32, title: str | None = None, description: str | None = None,
                 warn: Callable[[str], None] | None = None) -> Path:
    """Write a slider in kohya format for ComfyUI / AUTOMATIC1111 / Forge / diffusers / sd-scripts.

    Keys `{kohya_key}.lora_down.weight` = A (r, in[, kh, kw]), `.lora_up.weight` = B (out, r[, 1, 1]),
    `.alpha` () = alpha, so every reader's alpha / r scale matches ours. `source` is one of our
    files, a `SliderFactors`, or a peft state dict (`[unet.]{module}.lora_A.weight` ...) with
    `alpha` (default r, diffusers' rule for a file without alpha).

    Args:
        arch: "sd1" | "sd2" | "sdxl"; default: the file's `base_model_arch` header entry.
        warn: called once with a line naming modules sd-scripts will not load, if any.
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
    check_factors(factors, str(source) if isinstance(source, (str, Path)) else "slider")
    if alpha is not None and float(alpha) != factors.alpha:
        raise UsageError(f"alpha={alpha} contradicts the slider's own alpha {factors.alpha}")
    if not dtype.is_floating_point:
        raise UsageError(f"dtype must be a float dtype, got {dtype}")
    arch = arch or meta.get("base_model_arch")
    if arch is None:
        raise UsageError("the slider names no base model architecture (header base_model_arch); pass arch= sd1, sd2 or sdxl")
    out: dict[str, torch.Tensor] = flux_tensors(factors, dtype) if arch == "flux" else {}
    for name in sorted(factors.lora_A) if arch != "flux" else ():
        key = kohya_key(name, arch)
        out[f"{key}.lora_down.weight"] = factors.lora_A[name].to(dtype).contiguous()
        out[f"{key}.lora_up.weight"] = factors.lora_B[name].to(dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(factors.alpha, dtype=torch.float32)
    out_path = Path(out_path)
    label = meta.get("label", out_path.stem)
    title = title or (f"{meta['conceptkit.set']}/{label}" if "conceptkit.set" in meta else label)
    description = description or (f"conceptkit slider {label!r} for {meta['prompt']!r} on {meta.get('base_model', arch)}"
                                  if "prompt" in meta else f"conceptkit slider {label!r}")
    ours = kohya_header(factors, arch, title=title, description=description)
    extra = {**meta, **_check_metadata(metadata)}
    clash = sorted(set(extra) & set(ours))
    if clash:
        raise UsageError(f"slider metadata key {clash[0]!r} is written by the kohya export itself")
    if warn is not None and (skipped := sd_scripts_skips(factors.lora_A)):
        warn(f"kohya sd-scripts does not load {len(skipped)} of the {len(factors.lora_A)} slider modules "
             f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}): time and added embeddings and "
             "conv_in/conv_out lie outside the blocks its networks wrap; ComfyUI, AUTOMATIC1111, Forge and diffusers load them")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_path), metadata={**ours, **extra})
    return out_path
