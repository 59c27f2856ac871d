"""Where a model's weights come from: a path, the local Hugging Face cache, a diffusers folder.

All lookups are local: a hub id is resolved in the cache on disk (never over the network), and a
folder is checked for safetensors weights before diffusers is asked to load it, so a missing or
pickled-only model fails at once with a line saying what to do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from conceptkit.errors import ModelNotFoundError, UnsupportedModelError, UsageError
from conceptkit.single_file import CANONICAL_CONFIG_REPOS

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
PIPELINE_ARCH = {  # model_index.json `_class_name` -> loader family
    "StableDiffusionPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",  # LCM-distilled SD 1.5: same components
    "StableDiffusionXLPipeline": "sdxl",
}
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


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not when huggingface_hub was imported)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def cached_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of `repo_id` (its `main` revision), or `ModelNotFoundError`."""
    cache = hf_cache_dir()
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = None
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
    else:  # downloaded by commit hash only: accept the single snapshot there is
        snapshots = sorted(p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()) if repo_dir.is_dir() else []
        snapshot = snapshots[0] if len(snapshots) == 1 else None
    if snapshot is None or not snapshot.is_dir():
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({cache}); download it on a machine with "
            f"network (huggingface-cli download {repo_id}) or pass a local folder / .safetensors file"
        )
    return snapshot


def resolve_single_file_config(arch: str, config: str | Path | None, path: Path) -> tuple[Path, str]:
    """The local diffusers folder whose configs and tokenizers a single file is loaded with."""
    if config is not None:
        label = str(config)
        folder = Path(label).expanduser()
        if folder.is_dir():
            if not (folder / "model_index.json").is_file():
                raise UsageError(f"--config {label} is not a diffusers pipeline folder (no model_index.json)")
            return folder, label
        if HUB_ID_RE.match(label) and not label.startswith((".", "/", "~")):
            snapshot = cached_snapshot(label)
            if not (snapshot / "model_index.json").is_file():
                raise UsageError(f"--config {label} is in the cache but is not a diffusers pipeline (no model_index.json)")
            return snapshot, label
        raise ModelNotFoundError(f"--config {label}: no such folder, and not a Hugging Face id")
    tried = CANONICAL_CONFIG_REPOS[arch]
    for repo_id in tried:
        try:
            snapshot = cached_snapshot(repo_id)
        except ModelNotFoundError:
            continue
        if (snapshot / "model_index.json").is_file():
            return snapshot, repo_id
    raise ModelNotFoundError(
        f"{path.name} is an {arch} checkpoint, and loading it offline needs the configs of {' or '.join(tried)}, "
        f"which are not in the local Hugging Face cache ({hf_cache_dir()}); pass --config with a diffusers folder "
        f"of the same architecture (or download them: huggingface-cli download {tried[0]} --include '*.json' '*.txt')"
    )


def check_folder(folder: Path, spec: str) -> tuple[str, str | None]:
    """Check a pipeline folder before loading it (JSON and file names only): (family "sd"|"sdxl", variant)."""
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
        raise UnsupportedModelError(f"{spec} is {what} ({class_name}); conceptkit handles SD 1.x, SD 2.x and SDXL text-to-image")
    if family == "sdxl" and (index.get("text_encoder", [None])[0] is None or index.get("text_encoder_2", [None])[0] is None):
        raise UnsupportedModelError(f"{spec} is an SDXL pipeline without both text encoders (a refiner?); not supported")
    return family, check_weights(folder, index, spec)


def load_folder(folder: Path, spec: str):
    """Load a diffusers pipeline folder (a local folder or a cached snapshot) in fp32 on the CPU."""
    family, variant = check_folder(folder, spec)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        cls, extra = StableDiffusionXLPipeline, {"add_watermarker": False}
    else:
        cls = StableDiffusionPipeline
        extra = {"safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False}
    try:
        return cls.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, torch_dtype=torch.float32, variant=variant, **extra
        )
    except Exception as err:  # diffusers and transformers raise OSError, ValueError, EnvironmentError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsupportedModelError(f"could not load {spec}: {first[:300]}") from err


def check_weights(folder: Path, index: dict, spec: str) -> str | None:
    """Refuse pickled-only or missing weights before diffusers tries; return the variant to load."""
    variant = None
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
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
    return Path(__file__).resolve().parent / "toy" / "weights"


def toy_folder() -> Path:
    """The toy model's weights folder, or `ModelNotFoundError` saying how to train it."""
    folder = toy_weights_dir()
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"the toy model's weights are missing ({folder}); train them with `python -m conceptkit.toy.train`"
        )
    return folder
