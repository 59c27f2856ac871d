"""`conceptkit implant` end to end: check the images and the token, encode the images once, learn the
token's vector (resumable), write one artifact whole: the embedding in the layout diffusers,
AUTOMATIC1111 and ComfyUI load, and a manifest.

The artifact is keyed on the model's weights, the images' bytes and every setting that changes the
result, so a rerun is a cache hit. The embedding file holds one tensor, `emb_params` (1, d): the
single-tensor layout A1111 and ComfyUI read from their embeddings folders, and that diffusers'
`load_textual_inversion(path, token=...)` reads; its metadata names the token, the method, the base
model and the training (SDXL: `clip_l` and `clip_g`, one per text tower). A temporal or xti word
writes the mean of its vectors there, and all of them in conceptkit's own layout beside it, `vectors`
or, on SDXL, `vectors_l`/`vectors_g`. After a run the loaded pipeline knows the token (as
`--embedding` would have taught it), and `run` returns the model whose fingerprint says so.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from conceptkit import __version__, store
from conceptkit.diffusion import cross_attention_names, encode
from conceptkit.errors import UsageError
from conceptkit.image_folder import folder_digest, read_images
from conceptkit.implant.token import LearnedToken, check_new_token, check_supported, init_vectors
from conceptkit.implant.train import TEMPLATES, TOY_TEMPLATES, train
from conceptkit.models.textual_inversion import MAX_TEMPORAL_DIM, knowing
from conceptkit.settings import NOT_RECORDED, key_settings, manifest_settings

IMPLANT_FORMAT = 1
EMBEDDING_FILE = "embedding.safetensors"
METHODS = ("ti", "temporal", "xti")
TEMPORAL_FILE = "temporal.safetensors"
LAYERS_FILE = "xti.safetensors"
MAX_IMAGES = 256


@dataclass(frozen=True)
class ImplantConfig:
    """What to learn; every field enters the key unless its metadata says otherwise (`settings`)."""

    images: str = field(metadata=NOT_RECORDED)  # folder of the concept's images; enters the key by its bytes, not its path
    token: str  # the new word, e.g. "<my-thing>"
    init_word: str  # a word close to the concept: where the vector starts
    method: str = "ti"  # ti: one learned input embedding (Gal et al. 2022); temporal: one per timestep group; xti: one per cross-attention layer
    temporal_dim: int = 1  # D timestep groups of `temporal` (1 for ti)
    steps: int = 500  # optimiser steps
    lr: float = 5e-3  # AdamW learning rate of the vector
    batch_size: int = 4  # images per step
    seed: int = 0  # the batches, timesteps and noise
    progress_every: int = field(default=1, metadata=NOT_RECORDED)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.steps < 1:
            raise UsageError(f"--steps must be at least 1 (got {self.steps})")
        if self.method != "temporal" and self.temporal_dim != 1:
            raise UsageError(f"--temporal-dim {self.temporal_dim} needs --method temporal ({self.method} has no timestep groups)")
        if not 1 <= self.temporal_dim <= MAX_TEMPORAL_DIM:
            raise UsageError(f"--temporal-dim must be between 1 and {MAX_TEMPORAL_DIM} (got {self.temporal_dim})")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive number (got {self.lr})")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {self.batch_size})")


@dataclass(frozen=True)
class Implanted:
    key: str
    path: Path
    manifest: dict[str, Any]
    model: Any  # the LoadedModel that knows the token
    cached: bool
    seconds: float

    @property
    def embedding(self) -> Path:
        return self.path / EMBEDDING_FILE


def run(model, cfg: ImplantConfig, progress: Callable[..., None] | None = None, on_wait=None) -> Implanted:
    """Learn `cfg.token` from the images in `cfg.images` (see the module doc)."""
    started = time.perf_counter()
    # 1. every input checked before any work
    check_supported(model, cfg.method)
    check_new_token(model, cfg.token)
    starts = init_vectors(model, cfg.init_word)
    height, width = _size(model)
    arrays, names = read_images(Path(cfg.images), "IMAGES_DIR", (width, height))
    if len(arrays) > MAX_IMAGES:
        raise UsageError(f"IMAGES_DIR {cfg.images}: {len(arrays)} images; implant takes at most {MAX_IMAGES}")
    key = store.make_key({"format": IMPLANT_FORMAT, "model": model.identity(), "images": folder_digest(Path(cfg.images), "IMAGES_DIR"),
                          "settings": key_settings(cfg)})
    art = store.artifact("implant", key)
    if cfg.method == "temporal":
        starts = [v.expand(cfg.temporal_dim, -1).clone() for v in starts]
    layers = cross_attention_names(model.pipe.unet) if cfg.method == "xti" else []
    if layers:
        starts = [v.expand(len(layers), -1).clone() for v in starts]
    words = [LearnedToken(model, cfg.token, v, tower) for tower, v in enumerate(starts)]
    with art.lock(on_wait=on_wait):
        if art.exists():
            manifest = art.manifest()
            for word, vec in zip(words, _read_vectors(art.path, manifest), strict=True):
                with torch.no_grad():
                    word.vector.copy_(vec.to(word.vector.device))
            vecs = [w.finish() for w in words]
            return Implanted(key, art.path, manifest, _knowing(model, words, cfg.token, vecs, bool(layers)), True, time.perf_counter() - started)
        # 2. the images as latents, once
        images = torch.from_numpy(arrays.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
        latents = encode(model, images)
        # 3. learn the vectors (one per text tower), resumable
        work = art.path.parent / f".work-{key}"
        work.mkdir(parents=True, exist_ok=True)
        templates = TOY_TEMPLATES if model.spec == "toy" else TEMPLATES
        losses = train(model, words, latents, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                       templates=templates, checkpoint=work / "checkpoint.safetensors", key=key, progress=progress,
                       layers=bool(layers))
        vecs = [w.finish() for w in words]
        if not all(torch.isfinite(v).all() for v in vecs):
            raise UsageError("the learned vector holds NaN or infinite values; lower --lr")
        vec = vecs[0]
        # 4. one artifact, written whole
        manifest = {
            "created": time.time(), "complete": True, "token": cfg.token, "init_word": cfg.init_word, "method": cfg.method,
            "model": model.identity(), "images": str(Path(cfg.images).resolve()), "image_files": names, "count": len(names),
            "height": height, "width": width, "settings": manifest_settings(cfg), "templates": list(templates),
            "temporal_dim": cfg.temporal_dim, "file": EMBEDDING_FILE,
            **({"temporal_file": TEMPORAL_FILE} if cfg.method == "temporal" else {}),
            **({"layers_file": LAYERS_FILE, "layers": layers} if layers else {}), "loss": {"first": _mean(losses[:10]), "last": _mean(losses[-10:])},
            "seconds": round(time.perf_counter() - started, 3),
        }
        tmp = art.path.parent / f".tmp-{key}-{os.getpid()}"
        store.remove_tree(tmp)
        tmp.mkdir(parents=True)
        try:
            meta = _file_metadata(manifest, model)
            # one vector per tower (a temporal or xti word's mean over its groups or layers, what other tools can use)
            if len(vecs) == 2:  # SDXL: A1111's and ComfyUI's two-tower layout
                portable = {"clip_l": _mean_row(vecs[0]), "clip_g": _mean_row(vecs[1])}
            else:
                portable = {"emb_params": _mean_row(vec)}
            save_file(portable, str(tmp / EMBEDDING_FILE), metadata={**meta, "method": "ti" if vec.ndim == 1 else f"{cfg.method}-mean"})
            if vec.ndim == 2:  # conceptkit's own layout: every group's or layer's vector (generate and cluster read it)
                own = {"vectors": vec} if len(vecs) == 1 else {"vectors_l": vecs[0], "vectors_g": vecs[1]}  # SDXL: (D or G, d) per tower
                save_file({k: v.contiguous() for k, v in own.items()}, str(tmp / (LAYERS_FILE if layers else TEMPORAL_FILE)),
                          metadata={**meta, **({"layers": json.dumps(layers)} if layers else {})})
            store.Artifact("implant", key, tmp).write_manifest(manifest)
            store.publish(tmp, art.path)
        finally:
            store.remove_tree(tmp)
        shutil.rmtree(work, ignore_errors=True)
    return Implanted(key, art.path, art.manifest(), _knowing(model, words, cfg.token, vecs, bool(layers)), False, time.perf_counter() - started)


def _knowing(model, words: list[LearnedToken], token: str, vecs: list[torch.Tensor], layers: bool = False):
    """The model that knows the word, as `--embedding` with the file would give it (SDXL: the token's
    id in each tower, and both towers' vectors end to end)."""
    ids = words[0].id if len(words) == 1 else tuple(w.id for w in words)
    return knowing(model, token, ids, vecs[0] if len(vecs) == 1 else torch.cat(vecs, dim=-1), in_layers=layers)


def _mean_row(vec: torch.Tensor) -> torch.Tensor:
    """(1, d): the vector, or the mean of (D, d) vectors."""
    return (vec if vec.ndim == 1 else vec.mean(0))[None].contiguous()


def _size(model) -> tuple[int, int]:
    unet, vae_scale = model.pipe.unet, model.pipe.vae_scale_factor
    side = int(unet.config.sample_size) * int(vae_scale)
    return side, side


def _read_vectors(folder: Path, manifest: dict[str, Any]) -> list[torch.Tensor]:
    """Per text tower, the vectors a finished artifact holds."""
    from safetensors.torch import load_file

    if manifest.get("temporal_file") or manifest.get("layers_file"):
        own = load_file(str(folder / (manifest.get("temporal_file") or manifest["layers_file"])))
        return [own["vectors_l"].float(), own["vectors_g"].float()] if "vectors_l" in own else [own["vectors"].float()]
    tensors = load_file(str(folder / manifest["file"]))
    if "clip_l" in tensors:
        return [tensors["clip_l"][0].float(), tensors["clip_g"][0].float()]
    return [tensors["emb_params"][0].float()]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _file_metadata(manifest: dict[str, Any], model) -> dict[str, str]:
    """safetensors metadata (strings): what the file is and where it came from."""
    return {"conceptkit_version": __version__, "token": manifest["token"], "method": manifest["method"],
            "init_word": manifest["init_word"], "base_model": model.spec, "base_model_arch": model.arch,
            "base_model_fingerprint": model.fingerprint, "steps": str(manifest["settings"]["steps"]),
            "images": str(manifest["count"]), "temporal_dim": str(manifest["temporal_dim"])}
