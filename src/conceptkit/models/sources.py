"""Where a model's weights come from: a path, the Hugging Face cache (downloading what is missing), a folder.

A hub id is looked up in the local cache first and downloaded by `hub` when missing (or fails in
one line when offline); a folder is checked for safetensors weights before diffusers is asked to
load it, so a missing or pickled-only model fails at once with a line saying what to do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from conceptkit.errors import ModelNotFoundError, UnsupportedModelError, UsageError
from conceptkit.models import hub
from conceptkit.models.flow import FLOW_TINY_NAMES
from conceptkit.models.flow_single_file import FLOW_CONFIG_REPOS
from conceptkit.models.full import FULL_NAMES
from conceptkit.models.hub import cached_snapshot, hf_cache_dir  # noqa: F401 - re-exported: where cached models live
from conceptkit.models.hub_files import PIPELINE_ARCH
from conceptkit.models.memory import folder_dtypes
from conceptkit.models.single_file import CANONICAL_CONFIG_REPOS, inspect_single_file
from conceptkit.models.tiny import TINY_NAMES

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".bin", ".pt", ".pth")


def is_single_file_spec(spec: str) -> bool:
    """Whether `spec` names a single checkpoint file (an existing file, or a checkpoint suffix)."""
    return Path(spec).expanduser().is_file() or Path(spec).suffix.lower() in SINGLE_FILE_SUFFIXES


def looks_like_path(spec: str) -> bool:
    """A spec is a path when it exists, or is written like one (./x, /x, ~/x, C:\\x, x.safetensors)."""
    if os.path.exists(os.path.expanduser(spec)):
        return True
    if spec.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", spec) or "\\" in spec:
        return True
    return Path(spec).suffix.lower() in SINGLE_FILE_SUFFIXES


def hub_needs(spec: str, config: str | Path | None = None, *, prefer_fp16: bool = False) -> list[hub.Need]:
    """The hub repositories loading `spec` needs that are not in the local cache yet (no network call).

    Args:
        spec: as for `load_model`.
        config: as for `load_model`.
        prefer_fp16: the run computes in half precision (fp16 weights are downloaded where a repository has them).
    """
    spec = str(spec)
    if spec in TINY_NAMES or spec in FULL_NAMES or spec in FLOW_TINY_NAMES or spec in ("toy", "toy-turbo"):  # built-ins need nothing from the hub
        return []
    if looks_like_path(spec):
        path = Path(spec).expanduser()
        return config_needs(inspect_single_file(path).config_key, config, path) if path.is_file() else []
    if HUB_ID_RE.match(spec):
        need = pipeline_need(spec, prefer_fp16)
        return [] if hub.local_state(need)[0] is not None else [need]
    return []


def pipeline_need(spec: str, prefer_fp16: bool) -> hub.Need:
    return hub.Need(spec, "pipeline", role="model", prefer_fp16=prefer_fp16)


def config_needs(arch: str, config: str | Path | None, path: Path) -> list[hub.Need]:
    """The hub repository a single file borrows its configs from, when it is not local yet ([] otherwise)."""
    if config is not None:
        label = str(config)
        if Path(label).expanduser().is_dir() or not is_hub_id(label):
            return []
        need = _config_need(label, path, arch)
        return [] if hub.local_state(need)[0] is not None else [need]
    tried = CANONICAL_CONFIG_REPOS[arch]
    if any(hub.local_state(_config_need(repo_id, path, arch))[0] is not None for repo_id in tried):
        return []
    return [_config_need(tried[0], path, arch)]


def _config_need(repo_id: str, path: Path, arch: str) -> hub.Need:
    kind = "components" if arch in FLOW_CONFIG_REPOS else "config"  # FLUX / SD3: the text encoders' and VAE's weights too
    return hub.Need(
        repo_id, kind, role=f"configs of {path.name}" if kind == "config" else f"text encoders and VAE of {path.name}",
        alternative="or pass --config with a diffusers folder of the same architecture",
    )


def is_hub_id(spec: str) -> bool:
    """Whether `spec` is written like a Hugging Face id (org/name) rather than a path."""
    return bool(HUB_ID_RE.match(spec)) and not spec.startswith((".", "/", "~"))


def resolve_single_file_config(arch: str, config: str | Path | None, path: Path) -> tuple[Path, str]:
    """The local diffusers folder whose configs and tokenizers a single file is loaded with (downloaded if missing)."""
    if config is not None:
        label = str(config)
        folder = Path(label).expanduser()
        if folder.is_dir():
            if not (folder / "model_index.json").is_file():
                raise UsageError(f"--config {label} is not a diffusers pipeline folder (no model_index.json)")
            return folder, label
        if is_hub_id(label):
            snapshot = hub.resolve(_config_need(label, path, arch))
            if not (snapshot / "model_index.json").is_file():
                raise UsageError(f"--config {label} is in the cache but is not a diffusers pipeline (no model_index.json)")
            return snapshot, label
        raise ModelNotFoundError(f"--config {label}: no such folder, and not a Hugging Face id")
    tried = CANONICAL_CONFIG_REPOS[arch]
    for repo_id in tried:
        snapshot, _ = hub.local_state(_config_need(repo_id, path, arch))
        if snapshot is not None:
            return snapshot, repo_id
    return hub.resolve(_config_need(tried[0], path, arch)), tried[0]


def check_folder(folder: Path, spec: str) -> tuple[str, str | None]:
    """Check a pipeline folder before loading it (JSON and file names only): (family "sd"|"sdxl"|"flux"|"sd3", variant)."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        loose = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f" (pass the file itself: {folder / loose[0]})" if loose else ""
        raise UnsupportedModelError(f"{spec} is not a diffusers pipeline: no model_index.json in {folder}{hint}")
    try:
        index = json.loads(index_file.read_text())
    except ValueError as err:
        raise UnsupportedModelError(f"{spec}: model_index.json is not valid JSON ({err})") from err
    class_name = index.get("_class_name", "?")
    family = PIPELINE_ARCH.get(class_name)
    if family is None:
        what = "an SDXL refiner / image-to-image pipeline" if "Img2Img" in class_name else class_name
        raise UnsupportedModelError(f"{spec} is {what} ({class_name}); conceptkit handles SD 1.x, SD 2.x, SDXL, FLUX.1 and SD3 text-to-image")
    if family == "sdxl" and (index.get("text_encoder", [None])[0] is None or index.get("text_encoder_2", [None])[0] is None):
        raise UnsupportedModelError(f"{spec} is an SDXL pipeline without both text encoders (a refiner?); not supported")
    return family, check_pipeline_weights(folder, index, spec)


def load_folder(folder: Path, spec: str, target: torch.dtype = torch.float32):
    """Load a diffusers pipeline folder (a local folder or a cached snapshot) on the CPU: fp32, or for a
    half `target` each component in the half dtype it is stored in (`memory.folder_dtypes`)."""
    family, variant = check_folder(folder, spec)
    import diffusers

    if family in ("flux", "sd3"):
        cls, extra = getattr(diffusers, "FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline"), {}
    elif family == "sdxl":
        cls, extra = diffusers.StableDiffusionXLPipeline, {"add_watermarker": False}
    else:
        cls = diffusers.StableDiffusionPipeline
        extra = {"safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False}
    try:
        return cls.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, torch_dtype=folder_dtypes(folder, variant, target),
            variant=variant, **extra
        )
    except Exception as err:  # diffusers and transformers raise OSError, ValueError, EnvironmentError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsupportedModelError(f"could not load {spec}: {first[:300]}") from err


def check_pipeline_weights(folder: Path, index: dict, spec: str) -> str | None:
    """Refuse pickled-only or missing weights before diffusers tries; return the variant to load."""
    variant = None
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if name not in index or index[name][0] is None:
            continue
        sub = folder / name
        safe = sorted(p.name for p in sub.glob("*.safetensors")) + sorted(p.name for p in sub.glob("*.safetensors.index.json"))
        if not safe:
            pickles = sorted(p.name for p in sub.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
            if pickles:
                raise UsageError(
                    f"{spec}: {name}/ holds only pickled weights ({pickles[0]}); conceptkit loads .safetensors only "
                    "(re-save the model with safe_serialization, or download its .safetensors files)"
                )
            raise ModelNotFoundError(
                f"{spec}: no weights in {name}/ (an incomplete download?); download the model's .safetensors files"
            )
        plain = [s for s in safe if s.count(".") == 1 or (s.endswith(".index.json") and s.count(".") == 3)]
        if not plain and any(".fp16." in s for s in safe):
            variant = "fp16"
    return variant


def toy_weights_dir() -> Path:
    """Where the trained toy model lives: `conceptkit/toy/weights/`, a diffusers pipeline folder."""
    return Path(__file__).resolve().parent.parent / "toy" / "weights"


def toy_folder() -> Path:
    """The toy model's weights folder, or `ModelNotFoundError` saying how to train it."""
    folder = toy_weights_dir()
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"the toy model's weights are missing ({folder}); train them with `python -m conceptkit.toy.train`"
        )
    return folder
