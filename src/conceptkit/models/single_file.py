"""Single-file checkpoints: refuse pickles, detect the architecture from the keys, load offline.

A single `.safetensors` file in the original LDM/CompVis layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*` or `conditioner.embedders.*`) holds the weights but
no configs and no tokenizer. diffusers' `from_single_file` takes those from a diffusers folder
(`config=`); `models/sources.py` finds that folder (a `--config`, or the canonical repo of the
detected architecture, its configs downloaded when missing) and this module does the rest.
FLUX.1 and SD3 files (BFL's `double_blocks.*`, Stability's `joint_blocks.*`) give the transformer only;
the rest comes from a full diffusers folder (`flow_single_file.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from conceptkit.errors import UnsupportedModelError, UsageError
from conceptkit.models.flow_single_file import FLOW_CONFIG_REPOS, flow_file_arch, load_flow_transformer
from conceptkit.models.memory import file_dtype, folder_dtypes

SAFE_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")

# Where diffusers' own single-file loader takes each architecture's configs from.
CANONICAL_CONFIG_REPOS = {
    "sd1": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    "sd2": ("stabilityai/stable-diffusion-2-1",),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0",),
    **FLOW_CONFIG_REPOS,  # flux, flux-schnell, sd3: the transformer comes from the file, the rest from these
}

UNET = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT_1 = "conditioner.embedders.0.transformer."
SDXL_TEXT_2 = "conditioner.embedders.1.model."
SDXL_REFINER_TEXT = "conditioner.embedders.0.model."


@dataclass(frozen=True)
class SingleFileInfo:
    """What the keys of a single-file checkpoint say about it."""

    path: Path
    arch: str  # "sd1" | "sd2" | "sdxl" | "flux" | "sd3"
    context_dim: int  # the UNet's cross-attention width, read from the first attn2.to_k weight (0 for FLUX / SD3)
    n_tensors: int
    family: str = ""  # FLUX / SD3: the key of CANONICAL_CONFIG_REPOS ("flux", "flux-schnell", "sd3")

    @property
    def config_key(self) -> str:
        return self.family or self.arch


def check_single_file_suffix(path: Path) -> None:
    """Refuse anything but a safetensors file: a pickle can run code when loaded.

    Args:
        path: the file the user passed as --model.
    """
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UsageError(
            f"refusing to load {path.name}: {suffix} files are Python pickles, which can run code when loaded; "
            "conceptkit loads .safetensors only (convert it on a trusted machine, or download the .safetensors version)"
        )
    if suffix not in SAFE_SUFFIXES:
        raise UsageError(f"{path} is a file but not a .safetensors checkpoint; pass a .safetensors file or a diffusers folder")


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes) without reading any tensor."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError(f"implausible header size {size}")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is not a readable .safetensors file ({err})") from err
    header.pop("__metadata__", None)
    return header


def inspect_single_file(path: Path) -> SingleFileInfo:
    """Detect the architecture of an LDM-layout checkpoint from its key names.

    `conditioner.embedders.1` (a second, OpenCLIP text encoder) means SDXL, `cond_stage_model.model.`
    (OpenCLIP) SD 2.x, `cond_stage_model.transformer.` (OpenAI CLIP) SD 1.x. Anything else raises
    `UnsupportedModelError` naming what was found.

    Args:
        path: a `.safetensors` file.
    """
    check_single_file_suffix(path)
    header = _read_header(path)
    keys = list(header)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    family = flow_file_arch(keys)
    if family is not None:
        return SingleFileInfo(path=path, arch=family.removesuffix("-schnell"), context_dim=0, n_tensors=len(keys), family=family)
    found = _describe_foreign(keys, has)
    if found:
        raise UnsupportedModelError(f"{path.name} looks like {found}; conceptkit handles SD 1.x, SD 2.x and SDXL checkpoints")
    if not has(UNET):
        raise UnsupportedModelError(
            f"{path.name} has no UNet in the original layout (no '{UNET}*' keys); "
            "it is not a full SD 1.x / 2.x / SDXL checkpoint"
        )
    if has("conditioner.embedders.1."):
        if not has(SDXL_TEXT_1):
            raise UnsupportedModelError(f"{path.name} is an SDXL checkpoint without its first (CLIP ViT-L) text encoder")
        arch = "sdxl"
    elif has(SDXL_REFINER_TEXT):
        raise UnsupportedModelError(f"{path.name} is an SDXL refiner (one OpenCLIP text encoder), not a base model")
    elif has(SD2_TEXT):
        arch = "sd2"
    elif has(SD1_TEXT):
        arch = "sd1"
    else:
        raise UnsupportedModelError(
            f"{path.name} has a UNet but no text encoder ('cond_stage_model.*' or 'conditioner.embedders.*'); "
            "conceptkit needs a full checkpoint"
        )
    conv_in = header.get(UNET + "input_blocks.0.0.weight", {}).get("shape", [0, 4])
    if conv_in[1] != 4:
        raise UnsupportedModelError(
            f"{path.name} is an inpainting or other image-conditioned model (UNet input has {conv_in[1]} channels, not 4)"
        )
    to_k = sorted(k for k in keys if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    if not to_k:
        raise UnsupportedModelError(f"{path.name} has a UNet without cross-attention; not a text-to-image SD model")
    return SingleFileInfo(path=path, arch=arch, context_dim=int(header[to_k[0]]["shape"][1]), n_tensors=len(keys))


def _describe_foreign(keys: list[str], has) -> str:
    """A short name for a known non-SD layout, or "" when the keys look like LDM."""
    if any("lora_" in k or k.endswith(".alpha") for k in keys[:2000]):
        return "a LoRA (adapter weights), not a full checkpoint"
    if has("double_blocks.") or has(UNET + "double_blocks."):
        return "a FLUX transformer"
    if has("joint_blocks.") or has(UNET + "joint_blocks.") or has("text_encoders.clip_l."):
        return "a Stable Diffusion 3 model"
    if has("down_blocks.") and has("conv_in."):
        return "a diffusers-format component (a UNet or VAE on its own), not a full LDM checkpoint"
    if has("encoder.down.") and not has(UNET):
        return "a VAE on its own"
    return ""


def config_arch(config_dir: Path) -> tuple[str, int | None]:
    """The pipeline family ("sd" or "sdxl") of a diffusers config folder, and its UNet's context width.

    Args:
        config_dir: a diffusers pipeline folder (configs are enough; weights are not needed).
    """
    index = json.loads((config_dir / "model_index.json").read_text())
    family = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux",
              "StableDiffusion3Pipeline": "sd3"}.get(index.get("_class_name", ""))
    unet_config = config_dir / "unet" / "config.json"
    context = json.loads(unet_config.read_text()).get("cross_attention_dim") if unet_config.exists() else None
    if isinstance(context, list):
        context = context[0]
    return family or index.get("_class_name", "?"), context


def check_config_matches(info: SingleFileInfo, config_dir: Path, config_label: str) -> None:
    """Refuse a config folder of another architecture or context width than the checkpoint (cheap: JSON only).

    Args:
        info: what `inspect_single_file` found.
        config_dir: a local diffusers folder holding the pipeline's configs and tokenizer(s).
        config_label: how to name the config in messages (the --config value or the hub id).
        target: the run's dtype.
    """
    family, context = config_arch(config_dir)
    wanted = info.arch if info.arch in ("sdxl", "flux", "sd3") else "sd"
    if family != wanted:
        raise UsageError(
            f"config {config_label} is for {family} but {info.path.name} is an {info.arch} checkpoint; "
            "pass a --config of the same architecture"
        )
    transformer_config = config_dir / "transformer" / "config.json"
    if info.family.startswith("flux") and transformer_config.is_file():
        embeds = bool(json.loads(transformer_config.read_text()).get("guidance_embeds"))
        if embeds != (info.family == "flux"):
            raise UsageError(f"config {config_label} is a FLUX {'dev' if embeds else 'schnell'}-style transformer but "
                             f"{info.path.name} is {'schnell' if embeds else 'dev'}-style (guidance embedder "
                             f"{'absent' if embeds else 'present'}); pass a --config of the same variant")
    if context is not None and info.context_dim and context != info.context_dim:
        raise UsageError(
            f"config {config_label} has cross-attention width {context} but {info.path.name} has {info.context_dim}; "
            "pass the --config this checkpoint was trained from"
        )


def load_single_file(info: SingleFileInfo, config_dir: Path, config_label: str, target: torch.dtype = torch.float32):
    """Load a checkpoint with diffusers' `from_single_file`, offline, on the CPU: fp32, or for a half
    `target` in the half dtype the file (and each config component) is stored in (`models/memory.py`).

    Args:
        info: what `inspect_single_file` found.
        config_dir: a local diffusers folder holding the pipeline's configs and tokenizer(s).
        config_label: how to name the config in messages (the --config value or the hub id).
    """
    check_config_matches(info, config_dir, config_label)
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if info.arch in ("flux", "sd3"):
        transformer = load_flow_transformer(info.path, info.arch, config_dir, config_label, file_dtype(info.path, target))
        cls = FluxPipeline if info.arch == "flux" else StableDiffusion3Pipeline
        try:
            return cls.from_pretrained(config_dir, transformer=transformer, local_files_only=True, use_safetensors=True,
                                       torch_dtype=folder_dtypes(config_dir, None, target))
        except Exception as err:  # the config folder's other components missing or broken
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UnsupportedModelError(f"could not load the components of {info.path.name} from {config_label}: {first[:300]}") from err

    if info.arch == "sdxl":
        cls, extra = StableDiffusionXLPipeline, {"add_watermarker": False}
    else:
        cls = StableDiffusionPipeline
        extra = {"safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False}
    try:
        return cls.from_single_file(
            str(info.path), config=str(config_dir), local_files_only=True, torch_dtype=file_dtype(info.path, target), **extra
        )
    except Exception as err:  # diffusers raises ValueError, OSError, RuntimeError... for a bad pair
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsupportedModelError(
            f"could not load {info.path.name} with config {config_label}: {first[:300]}"
        ) from err
