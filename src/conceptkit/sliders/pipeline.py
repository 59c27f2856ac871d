"""SliderSpace: decompose what a model draws for a prompt into K rank-1 LoRA sliders.

Gandikota et al. (2025), "SliderSpace: Decomposing the Visual Capabilities of Diffusion
Models", Sec. 3: (1) sample the prompt and keep the predicted x0 of every denoising step,
(2) decode and embed them, (3) PCA to K principal directions, (4) train one rank-1 LoRA per
direction so that the slider moves the embedding along it, all K in one batched pass
(`slider_train`), (5) measure and label each slider (`slider_labels`), (6) write the set.

A set is a folder `<data>/sliders/<name>/` with `manifest.json` and `slider-XX.safetensors`
files in the diffusers/peft LoRA layout. It is built in a hidden work folder and renamed into
place at the end, so a killed run never leaves half a set; the work folder keeps the harvest
key and a training checkpoint, and a rerun with the same settings resumes from it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptkit import capacity, harvest, store
from conceptkit.diffusion import decode_batched, restore_requires_grad, save_requires_grad
from conceptkit.errors import DamagedArtifactError, UsageError
from conceptkit.models.flow import denoiser
from conceptkit.parallel import barrier, processes, share_rows, sum_across
from conceptkit.settings import IN_KEY_UNLESS_DEFAULT, IN_MANIFEST_ONLY, NOT_RECORDED, key_settings, manifest_settings
from conceptkit.sliders.bank import DEFAULT_TARGETS, SliderLoraConfig, install_sliders
from conceptkit.sliders.train import (
    DIRECTION_METHODS,
    PairSource,
    TrainSettings,
    encode_conditioning,
    principal_directions,
    train,
)
from conceptkit.features import check_spec, load_encoder, resolve_spec
from conceptkit.harvest import _versions
from conceptkit.sliders import calibrate as slider_calibrate, labels as slider_labels

SET_FORMAT = 1
MAX_COUNT = 64
MAX_CALIBRATION_SEEDS = 256
Progress = Callable[..., None]
Stage = Callable[[str], None]


@dataclass(frozen=True)
class SlidersConfig:
    """Settings of one SliderSpace run; every field enters the key unless its metadata says otherwise (`settings`)."""

    prompt: str
    count: int = 16  # K sliders = principal directions
    samples: int = 16  # harvested trajectories
    x0: str = "all"  # "all": x0 of every step enters PCA (the paper); "final": only the last step (ablation)
    directions: str = field(default="pca", metadata=IN_KEY_UNLESS_DEFAULT)  # pca (the paper) | ica (`train.principal_directions`)
    encoder: str = "auto"  # auto | pixel[:side] | toy | clip:<id|folder> | dinov2:<id|folder>
    rank: int = 1  # LoRA rank of each slider
    alpha: float = 1.0  # LoRA alpha
    targets: str = DEFAULT_TARGETS  # regex of UNet modules (default: cross-attention k/v projections)
    steps: int | None = None  # denoising steps of the harvest; None: the model's default
    guidance: float | None = None  # guidance scale of harvest and training; None: the model's default
    seed: int = 0  # harvest seed, PCA and init seed
    train: TrainSettings = field(default_factory=TrainSettings)
    # seeds of the strength calibration (`sliders.calibrate`); 0: the sliders as trained (the paper's)
    calibration_seeds: int = field(default=0, metadata=IN_KEY_UNLESS_DEFAULT)
    name: str | None = field(default=None, metadata=IN_MANIFEST_ONLY)  # set name; default: slug of the prompt
    overwrite: bool = field(default=False, metadata=NOT_RECORDED)  # replace an existing set trained with other settings
    gradient_checkpointing: bool = field(default=False, metadata=NOT_RECORDED)  # recompute UNet and VAE-decoder activations in backward: less memory, same result

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise UsageError("empty prompt: give the concept as text, e.g. 'a person'")
        if not 1 <= self.count <= MAX_COUNT:
            raise UsageError(f"--count must be between 1 and {MAX_COUNT} (got {self.count})")
        if self.samples < 2:
            raise UsageError(f"--samples must be at least 2 (got {self.samples})")
        if self.x0 not in ("all", "final"):
            raise UsageError(f"--x0 must be all or final (got {self.x0})")
        if self.directions not in DIRECTION_METHODS:
            raise UsageError(f"--directions must be one of {', '.join(DIRECTION_METHODS)} (got {self.directions!r})")
        if self.rank < 1:
            raise UsageError(f"--rank must be at least 1 (got {self.rank})")
        if not self.alpha > 0:
            raise UsageError(f"--alpha must be positive (got {self.alpha})")
        if not 0 <= self.calibration_seeds <= MAX_CALIBRATION_SEEDS:
            raise UsageError(f"--calibration-seeds must be between 0 and {MAX_CALIBRATION_SEEDS} (got {self.calibration_seeds})")
        if self.name is not None:
            store.check_name(self.name, "slider set name")

        check_spec(self.encoder)
        try:
            SliderLoraConfig(self.count, rank=self.rank, alpha=self.alpha, target_modules=self.targets)
        except Exception as exc:
            raise UsageError(f"bad slider settings: {exc}") from exc

    @property
    def set_name(self) -> str:
        return self.name or store.slugify(self.prompt)


@dataclass(frozen=True)
class SliderInfo:
    """One slider of a set."""

    index: int  # rank in explained variance, from 0
    label: str
    explained_variance: float  # share of the embedding variance of its direction
    file: str  # file name inside the set folder
    effect_size: float = 0.0  # mean embedding shift at the training strength
    alignment: float = 0.0  # cosine of the measured shift with its direction
    label_score: float = 0.0  # cosine of the shift with the label's text shift


@dataclass(frozen=True)
class SliderSet:
    """A slider set in the store."""

    name: str
    path: Path
    manifest: dict[str, Any]
    sliders: tuple[SliderInfo, ...]
    cached: bool = False
    seconds: float = 0.0

    @property
    def prompt(self) -> str:
        return self.manifest["prompt"]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "prompt": self.prompt, "model": self.manifest["model"],
                "encoder": self.manifest["encoder"], "cached": self.cached, "seconds": round(self.seconds, 3),
                "sliders": [{**asdict(s), "file": str(self.path / s.file)} for s in self.sliders]}


def set_key(model, cfg: SlidersConfig, encoder_spec: str) -> str:
    settings = key_settings(cfg)
    settings["encoder"] = encoder_spec
    if cfg.calibration_seeds:
        settings["calibration_target"] = slider_calibrate.TARGET
    return store.make_key({"format": SET_FORMAT, "model": model.identity(), "settings": settings})


def from_manifest(path: Path, manifest: dict[str, Any], **extra) -> SliderSet:
    sliders = tuple(SliderInfo(**{k: s[k] for k in SliderInfo.__dataclass_fields__ if k in s}) for s in manifest["sliders"])
    return SliderSet(manifest["name"], path, manifest, sliders, **extra)


def run(model, cfg: SlidersConfig, progress: Progress | None = None, stage: Stage | None = None,
        on_wait=None) -> SliderSet:
    """Harvest, embed, PCA, train, label and write the set `cfg.set_name` (see the module doc)."""

    proc, world = processes()
    say = (stage or (lambda _m: None)) if proc == 0 else (lambda _m: None)
    started = time.perf_counter()
    encoder_spec = resolve_spec(cfg.encoder, model.spec)
    key = set_key(model, cfg, encoder_spec)
    name = cfg.set_name
    art = store.artifact("sliders", name)
    # Processes of one launch share the sliders (slider k trains in process k % world); separate
    # runs take the set's lock, which the main process holds for the whole launch.
    guard = art.lock(on_wait=on_wait) if proc == 0 else contextlib.nullcontext()
    with guard:
        # 0. a set of that name: the same settings are done; others need --overwrite
        if art.exists():
            try:
                m = art.manifest()
            except DamagedArtifactError:
                if not cfg.overwrite:
                    raise  # names the set's path and the command that clears it
                m = {}  # --overwrite replaces a damaged set like any other
            if m.get("settings_key") == key:
                _drop_finished_work(art, key, proc)
                return from_manifest(art.path, m, cached=True, seconds=time.perf_counter() - started)
            if not cfg.overwrite:
                raise UsageError(f"slider set {name!r} exists with other settings; pass --overwrite to replace it "
                                 f"or --name to keep both")
        work = art.path.parent / f".work-{name}"
        state = work / "state.json"
        if proc == 0:
            if work.exists() and _state_key(state) != key:
                shutil.rmtree(work, ignore_errors=True)  # a work folder from other settings: start clean
            for stale in _temporary_sets(art):  # left by a run of this set killed while writing
                shutil.rmtree(stale, ignore_errors=True)
        barrier(world)
        encoder = load_encoder(encoder_spec, model.spec, model.device)  # a missing encoder fails before any work
        # 1. harvest (cached and resumable by itself)
        say("harvesting")
        hcfg = harvest.HarvestConfig(prompts=(cfg.prompt,), samples=cfg.samples, steps=cfg.steps,
                                     guidance=cfg.guidance, seed=cfg.seed, record=("x0", "xt"))
        # the PCA holds every recorded step of every trajectory in float32: refuse before sampling if it cannot
        capacity.check_memory(2 * capacity.harvest_bytes(model, hcfg.resolved(model), cfg.samples), "the harvest for the PCA")
        hres = harvest.run(model, hcfg, on_wait=on_wait)
        h = harvest.load_harvest(hres.path, samples=cfg.samples)
        guidance = float(hres.manifest["settings"]["guidance"])
        size = (int(hres.manifest["settings"]["height"]), int(hres.manifest["settings"]["width"]))
        # 2. decode and embed the x0 of every step (or of the last)
        say(f"embedding with {encoder_spec}")
        x0 = h.x0 if cfg.x0 == "all" else h.x0[:, -1:]
        emb = encoder.embed(decode_batched(model, x0.flatten(0, 1).float())).numpy()
        # 3. principal directions
        dirs = principal_directions(emb, cfg.count, seed=cfg.seed, method=cfg.directions)
        # 4. all K sliders in one batched pass
        unet = denoiser(model.pipe)  # the UNet, or FLUX's / SD3's transformer
        bank = install_sliders(unet, SliderLoraConfig(cfg.count, rank=cfg.rank, alpha=cfg.alpha,
                                                      target_modules=cfg.targets, seed=cfg.seed))
        saved = save_requires_grad(p for part in (model.pipe.vae, model.pipe.text_encoder, getattr(model.pipe, "text_encoder_2", None),
                                                  getattr(model.pipe, "text_encoder_3", None))
                                   if part is not None for p in part.parameters())
        try:
            for p, _ in saved:
                p.requires_grad_(False)
            if cfg.gradient_checkpointing:
                _checkpointing(model, bank, True)
            cond = encode_conditioning(model, [cfg.prompt], guidance, size)
            pairs = PairSource(h.xt, h.timesteps, h.prompt_index, cfg.train.start, cfg.train.seed)
            directions = torch.from_numpy(dirs.components).float()
            say(f"training {cfg.count} sliders" + (f" in {world} processes" if world > 1 else ""))
            mine = torch.arange(proc, cfg.count, world)
            if proc == 0:
                work.mkdir(parents=True, exist_ok=True)
                store.write_json(work / "state.json", {"key": key, "name": name})
            barrier(world)
            ckpt = work / ("checkpoint.safetensors" if world == 1 else f"checkpoint-{proc}-of-{world}.safetensors")
            losses = train(model, bank, encoder, pairs, cond, guidance, directions, cfg.train, checkpoint=ckpt,
                           key=key, progress=progress if proc == 0 else None,
                           sliders=mine if world > 1 else None)
            loss = _loss_summary(losses)
            if world > 1:
                loss = _share_trained(bank, mine, loss)
            # 5. one strength factor for the set, then measure and label
            calibration = None
            if cfg.calibration_seeds:
                say(f"calibrating the strength on {cfg.calibration_seeds} seeds")
                final = emb.reshape(len(x0), -1, emb.shape[-1])[:, -1]  # the harvest's last-step (final image) embeddings
                calibration = slider_calibrate.calibrate(model, bank, encoder, cfg.prompt, dirs.components, final,
                                                         seeds=cfg.calibration_seeds, steps=len(h.timesteps),
                                                         guidance=guidance, start=cfg.train.start)
            say("measuring and labelling")

            effects = slider_labels.measure_effects(model, bank, encoder, pairs, cond, guidance, dirs.components,
                                            strength=cfg.train.strength)
            labels, scores, how = slider_labels.label(effects, encoder, cfg.prompt)
            # 6. write the set into a temporary folder, then rename it into place (the main process)
            manifest = _manifest(model, cfg, name, key, encoder_spec, hres, dirs, effects, labels, scores, how,
                                 loss, size, guidance, len(h.timesteps), time.perf_counter() - started)
            if calibration is not None:
                manifest["calibration"] = calibration.to_json()
            if proc == 0:
                tmp = art.path.parent / f".tmp-{name}-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                for s in manifest["sliders"]:
                    bank.save_slider(s["index"], tmp / s["file"], _file_metadata(manifest, s))
                store.Artifact("sliders", name, tmp).write_manifest(manifest)
        finally:
            if cfg.gradient_checkpointing:
                _checkpointing(model, bank, False)
            bank.remove()
            restore_requires_grad(saved)
            if proc == 0 and work.is_dir() and not any(work.glob("checkpoint*.safetensors")):
                shutil.rmtree(work, ignore_errors=True)  # nothing to resume from (a full disk, an early failure)
        if proc == 0:
            store.publish(tmp, art.path)
            shutil.rmtree(work, ignore_errors=True)
        barrier(world)
        return from_manifest(art.path, art.manifest(), seconds=time.perf_counter() - started)


def _temporary_sets(art: store.Artifact) -> list[Path]:
    """The `.tmp-NAME-PID` folders of this set only (not of a set whose name merely starts with NAME)."""
    pattern = re.compile(rf"^\.tmp-{re.escape(art.key)}-\d+$")
    return [p for p in art.path.parent.iterdir() if pattern.match(p.name)]


def _drop_finished_work(art: store.Artifact, key: str, proc: int) -> None:
    """Remove the work folder (checkpoint, state) of a set already written with these settings."""
    work = art.path.parent / f".work-{art.key}"
    if proc == 0 and work.is_dir() and _state_key(work / "state.json") in (key, None):
        shutil.rmtree(work, ignore_errors=True)  # None: an unreadable state belongs to no resumable run


def _state_key(state: Path) -> str | None:
    """The settings key a work folder's state.json names; None if it is missing or malformed."""
    try:
        doc = store.read_json(state)
    except (FileNotFoundError, store.StoreError):
        return None
    return doc.get("key") if isinstance(doc, dict) and isinstance(doc.get("key"), str) else None


def _checkpointing(model, bank, on: bool) -> None:
    """Gradient checkpointing of the UNet (replaying each forward's slider routing) and the VAE decoder."""
    unet, vae = denoiser(model.pipe), model.pipe.vae
    if on:
        unet.enable_gradient_checkpointing(bank.checkpoint)
        vae.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
        vae.disable_gradient_checkpointing()


def _loss_summary(losses: list[float]) -> dict[str, float | None]:
    return {"first": losses[0] if losses else None, "last": float(np.mean(losses[-10:])) if losses else None}


def _share_trained(bank, mine: torch.Tensor, loss: dict[str, float | None]) -> dict[str, float | None]:
    """After a slider-parallel run: every process gets every slider's trained factors, and the losses
    of the shares are summed into the K-slider loss (a share resumed from its checkpoint ran no step
    in this call: its loss counts as 0 here)."""
    share_rows(bank.parameters(), mine)
    first, last = sum_across([loss[k] or 0.0 for k in ("first", "last")])
    return {"first": first, "last": last}


def _manifest(model, cfg, name, key, encoder_spec, hres, dirs, effects, labels, scores, how, loss, size,
              guidance, n_steps, seconds) -> dict[str, Any]:
    settings = manifest_settings(cfg)
    settings["encoder"] = encoder_spec
    sliders = [
        {"index": i, "label": labels[i], "explained_variance": float(dirs.explained_variance_ratio[i]),
         "file": f"slider-{i:02d}.safetensors", "effect_size": float(effects.size[i]),
         "alignment": float(effects.alignment[i]), "label_score": float(scores[i])}
        for i in range(cfg.count)
    ]
    return {
        "name": name, "prompt": cfg.prompt, "prompts": [cfg.prompt], "model": model.identity(), "encoder": encoder_spec,
        "settings": settings, "settings_key": key, "harvest": hres.key, "guidance": guidance,
        "steps": n_steps, "height": size[0], "width": size[1], "start": cfg.train.start,
        "directions": dirs.components.tolist(), "label_method": how, "sliders": sliders,
        "loss": loss,
        "created": time.time(), "seconds": seconds, "complete": True, "versions": _versions(),
    }


def _file_metadata(manifest: dict[str, Any], slider: dict[str, Any]) -> dict[str, str]:
    """What each slider file's safetensors header carries (str -> str)."""
    import json

    m = manifest["model"]
    return {
        "conceptkit.version": manifest["versions"]["conceptkit"], "conceptkit.set": manifest["name"],
        "base_model": m["spec"], "base_model_arch": m["arch"], "base_model_fingerprint": m["fingerprint"],
        "prompt": manifest["prompt"], "component_index": str(slider["index"]), "label": slider["label"],
        "explained_variance": repr(slider["explained_variance"]), "encoder": manifest["encoder"],
        "settings": json.dumps(manifest["settings"], sort_keys=True), "start": repr(manifest["start"]),
        "strength_scale": repr(float((manifest.get("calibration") or {}).get("scale", 1.0))),
    }
