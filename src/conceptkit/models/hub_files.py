"""Which files of a Hugging Face repository a run needs: rules on file names, no network.

A diffusers pipeline repository holds more than conceptkit loads: a safety checker, ONNX and
OpenVINO exports, a single-file copy of the whole model, non-EMA and fp16 duplicates of each
component. diffusers' own download filters by component and variant; this does the same from
the hub's file listing, so a run downloads (and announces) only what it will load, and refuses
a repository it cannot load (pickled-only weights, another architecture) before downloading.
"""

from __future__ import annotations

from conceptkit.errors import ModelNotFoundError, UnsupportedModelError, UsageError

PIPELINE_ARCH = {  # model_index.json `_class_name` -> loader family
    "StableDiffusionPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",  # LCM-distilled SD 1.5: same components
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",  # FLUX.1 dev / schnell (models/flow.py)
    "StableDiffusion3Pipeline": "sd3",  # SD3 / SD3.5
}
WEIGHTED = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")  # components whose weights are loaded
NOT_LOADED = ("safety_checker", "feature_extractor", "image_encoder")  # the loader passes None for these
CONFIG_SUFFIXES = (".json", ".txt")  # configs, scheduler settings, tokenizer vocabularies and merges
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def weight_variant(name: str) -> str | None:
    """The variant a safetensors weight file name carries: None (plain), "fp16", "non_ema", ... or "" (not weights).

    Plain: `model.safetensors`, `diffusion_pytorch_model-00001-of-00002.safetensors`,
    `model.safetensors.index.json`; variants: `model.fp16.safetensors`,
    `model.fp16-00001-of-00002.safetensors`, `model.safetensors.index.fp16.json`.

    Args:
        name: a file name without folders.
    """
    parts = name.split(".")
    if len(parts) >= 4 and parts[-3:] == ["safetensors", "index", "json"]:
        return None if len(parts) == 4 else ""
    if len(parts) == 5 and parts[1:3] == ["safetensors", "index"] and parts[-1] == "json":
        return parts[3]
    if parts[-1] == "safetensors":
        if len(parts) == 2:
            return None
        if len(parts) == 3:
            return parts[1].split("-")[0]
    return ""


def _in_folder(files: dict[str, int | None], folder: str) -> list[str]:
    """The names of the files directly inside `folder` ("" for the repository's root)."""
    if not folder:
        return sorted(p for p in files if "/" not in p)
    prefix = folder + "/"
    return sorted(p[len(prefix):] for p in files if p.startswith(prefix) and "/" not in p[len(prefix):])


def _configs(names: list[str]) -> list[str]:
    """Config and tokenizer files among `names` (not the index of sharded weights)."""
    return [n for n in names if n.endswith(CONFIG_SUFFIXES) and weight_variant(n) == "" and ".index." not in n]


def _weight_sets(names: list[str]) -> dict[str | None, list[str]]:
    """Safetensors weight files among `names`, grouped by variant (None: plain)."""
    sets: dict[str | None, list[str]] = {}
    for n in names:
        variant = weight_variant(n)
        if variant != "":
            sets.setdefault(variant, []).append(n)
    return sets


def _refuse_unweighted(repo_id: str, where: str, names: list[str]) -> None:
    """Raise for a component (or encoder) with no safetensors weights: pickles are refused, nothing is missing."""
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UsageError(
            f"{repo_id}: {where} holds only pickled weights ({pickles[0]}) on the Hugging Face Hub; conceptkit loads "
            ".safetensors only (use a repository with .safetensors weights, or convert it on a trusted machine)"
        )
    raise UnsupportedModelError(f"{repo_id}: no weights in {where} on the Hugging Face Hub; not a loadable model")


def select_pipeline_files(
    repo_id: str, index: dict, files: dict[str, int | None], *, prefer_fp16: bool, configs_only: bool = False,
    skip_weights: tuple[str, ...] = (),
) -> list[str]:
    """The files of a diffusers pipeline repository that loading it needs, or an error naming why it cannot load.

    Per component in `model_index.json` (minus the safety checker, feature extractor and image
    encoder, which the loader leaves out): its `.json`/`.txt` files and, unless `configs_only`,
    one set of safetensors weights: fp16 when `prefer_fp16` and every component has it, else
    plain (fp32) where a component has it, else fp16.

    Args:
        repo_id: the repository, for messages.
        index: the parsed `model_index.json`.
        files: repository path -> size in bytes (None when the listing has no size).
        prefer_fp16: the run computes in half precision (fp16 weights load identically, at half the download).
        configs_only: only configs and tokenizers (what a single-file checkpoint borrows).
        skip_weights: components whose weights are not needed (a FLUX / SD3 single file's transformer).
    """
    class_name = index.get("_class_name", "?")
    if class_name not in PIPELINE_ARCH:
        what = "an SDXL refiner / image-to-image pipeline" if "Img2Img" in class_name else class_name
        raise UnsupportedModelError(f"{repo_id} is {what} ({class_name}); conceptkit handles SD 1.x, SD 2.x, SDXL, FLUX.1 and SD3 text-to-image")
    components = sorted(
        k for k, v in index.items()
        if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None and k not in NOT_LOADED
    )
    chosen = ["model_index.json"]
    weights: dict[str, dict[str | None, list[str]]] = {}
    for comp in components:
        names = _in_folder(files, comp)
        configs = _configs(names)
        if not configs:
            raise UnsupportedModelError(f"{repo_id}: model_index.json names {comp}, but {comp}/ has no config on the Hugging Face Hub")
        chosen += [f"{comp}/{n}" for n in configs]
        if comp in WEIGHTED and not configs_only and comp not in skip_weights:
            sets = _weight_sets(names)
            if None not in sets and "fp16" not in sets:
                _refuse_unweighted(repo_id, f"{comp}/", names)
            weights[comp] = sets
    if weights:
        all_fp16 = all("fp16" in sets for sets in weights.values())
        for comp, sets in weights.items():
            variant = "fp16" if (prefer_fp16 and all_fp16) or None not in sets else None
            chosen += [f"{comp}/{n}" for n in sets[variant]]
    return chosen


def select_encoder_files(repo_id: str, files: dict[str, int | None]) -> list[str]:
    """The files of a transformers image-encoder repository (CLIP, DINOv2) that loading it needs.

    Root-level `.json`/`.txt` files (config, preprocessor, tokenizer) and the plain safetensors
    weights; pickled-only repositories are refused.

    Args:
        repo_id: the repository, for messages.
        files: repository path -> size in bytes.
    """
    names = _in_folder(files, "")
    if "config.json" not in names:
        raise UnsupportedModelError(f"{repo_id} has no config.json on the Hugging Face Hub; not a transformers model")
    sets = _weight_sets(names)
    if None not in sets:
        _refuse_unweighted(repo_id, "the repository", names)
    return _configs(names) + sets[None]


def missing_repo_hint(repo_id: str, configs_only: bool = False, skip_transformer: bool = False) -> str:
    """The command that downloads `repo_id` (what an error tells a user to run where there is network)."""
    if skip_transformer:
        return f"hf download {repo_id} --exclude 'transformer/*'"
    if configs_only:
        return f"hf download {repo_id} --include '*.json' '*.txt'"
    return f"hf download {repo_id}"


def require_model_index(repo_id: str, files: dict[str, int | None]) -> None:
    """Refuse a repository that is not a diffusers pipeline, before anything is downloaded."""
    if "model_index.json" not in files:
        loose = sorted(p for p in files if "/" not in p and p.endswith(".safetensors"))
        hint = f" (download the single file and pass it: hf download {repo_id} {loose[0]})" if loose else ""
        raise ModelNotFoundError(f"{repo_id} is not a diffusers pipeline on the Hugging Face Hub (no model_index.json){hint}")
