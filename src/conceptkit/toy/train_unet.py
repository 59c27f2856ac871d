"""Stage 3: train the toy UNet on precomputed VAE latents, conditioned on the frozen text tower.

Recipe: v-prediction (Salimans & Ho (2022), Sec. 4) on the cosine schedule (Nichol & Dhariwal
(2021), Sec. 3.2), unweighted MSE over uniformly drawn timesteps (so low-noise steps keep their
full weight), an EMA of the weights, and caption dropout to "" for classifier-free guidance
(Ho & Salimans (2022), Sec. 3.2).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conceptkit.toy import coupling
from conceptkit.toy.checkpoint import flatten_optimizer, load_latest, prefixed, restore_optimizer, replace_folder, save_checkpoint, unprefixed
from conceptkit.toy.data import captions_for, draw_mentions, make_pool, step_generator, step_rng
from conceptkit.toy.model import ToyArchitecture, build_scheduler, build_unet
from conceptkit.toy.train_clip import tokenize
from conceptkit.toy.train_vae import encode_latents
from conceptkit.toy.world import FACTORS, sample_scenes


@dataclass(frozen=True)
class UnetTrainConfig:
    """Settings of the UNet stage."""

    steps: int = 60_000  # optimiser steps (the run is meant to be stopped and resumed freely)
    batch: int = 64
    lr: float = 1e-3  # AdamW learning rate, constant after warm-up
    warmup: int = 500
    weight_decay: float = 0.01
    ema_decay: float = 0.999  # EMA of the weights (after a (1+n)/(10+n) warm-up), exported as the model
    p_mention: float = 0.7  # probability a caption names a factor
    p_uncond: float = 0.1  # caption dropped to "" (classifier-free guidance)
    pool: int = 80_000  # fixed training images, encoded to latents once
    seed: int = 0
    checkpoint_every_s: float = 240.0  # wall seconds between checkpoints (and pipeline exports)
    coupled: bool = False  # the noise decides the factors a caption leaves open (`toy.coupling`)
    high_t_share: float = 0.0  # share of each batch drawn from the noisy end of the schedule, where coupling is learned
    high_t_from: float = 0.5  # ... namely from this fraction of the timesteps on

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch <= 0 or self.pool < self.batch:
            raise ValueError("need steps > 0, batch > 0 and pool >= batch")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        for name in ("p_mention", "p_uncond", "high_t_share", "high_t_from"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def load_frozen(workdir: Path, clip_name: str = "clip"):
    """The exported tokenizer, text encoder (`CLIPTextModel`) and VAE of the earlier stages."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    clip_dir, vae_dir = workdir / "export" / clip_name, workdir / "export" / "vae"
    if not clip_dir.exists() or not vae_dir.exists():
        raise FileNotFoundError(f"run the clip and vae stages first (missing {clip_dir} or {vae_dir})")
    clip = CLIPModel.from_pretrained(clip_dir)
    text = CLIPTextModel(clip.config.text_config)
    getattr(text, "text_model", text).load_state_dict(clip.text_model.state_dict(), strict=True)  # transformers 4 nests it
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    return tok, text.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def latent_pool(config: UnetTrainConfig, vae, cache: Path, log: Callable[[str], None]) -> torch.Tensor:
    """(pool, 4, 8, 8) scaled latents of the fixed pool, cached in `cache` (safetensors)."""
    if cache.exists():
        return load_file(str(cache))["latents"]
    chunks = []
    for start in range(0, config.pool, 10_000):
        n = min(10_000, config.pool - start)
        part = make_pool(n, seed=config.seed * 7919 + 100 + start // 10_000)
        chunks.append(encode_latents(vae, part.images) * vae.config.scaling_factor)
        log(f"unet: encoded {start + n}/{config.pool} latents")
    latents = torch.cat(chunks).contiguous()
    tmp = cache.with_suffix(".tmp")
    save_file({"latents": latents}, str(tmp))
    tmp.replace(cache)
    return latents


def pool_scenes(config: UnetTrainConfig):
    """The scenes of `latent_pool`, in the same order."""
    scenes = []
    for start in range(0, config.pool, 10_000):
        scenes += sample_scenes(min(10_000, config.pool - start), seed=config.seed * 7919 + 100 + start // 10_000)
    return scenes


def current_vae(workdir: Path, vae, log: Callable[[str], None]):
    """The exported VAE as now on disk (a decoder-only fine-tune may have improved it), else `vae`.

    The encoder defines the latent space the UNet learns, so a VAE whose encoder or scaling factor
    differs from the one the latents were made with is refused.
    """
    from diffusers import AutoencoderKL

    try:
        disk = AutoencoderKL.from_pretrained(workdir / "export" / "vae").eval()
    except (OSError, ValueError) as err:
        log(f"unet: could not reload the VAE ({err}); exporting the one in memory")
        return vae
    mine, theirs = vae.state_dict(), disk.state_dict()
    enc = [k for k in mine if k.startswith(("encoder.", "quant_conv."))]
    same = disk.config.scaling_factor == vae.config.scaling_factor and all(k in theirs and torch.equal(mine[k], theirs[k]) for k in enc)
    if not same:
        log("unet: the VAE on disk has another encoder; exporting the one the latents were made with")
        return vae
    return disk


def export_pipeline(unet, tok, text, vae, clip_dir: Path, output: Path, provenance: dict | None = None,
                    extra: list[Path] | None = None) -> None:
    """Save a loadable `StableDiffusionPipeline` (plus the full CLIP in `clip/`, given, what training
    produced it in `training.json`, and the `extra` files) to `output`, atomically."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=build_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for attempt in range(5):  # the clip-vision stage may be swapping clip_dir right now
        try:
            shutil.rmtree(tmp / "clip", ignore_errors=True)
            shutil.copytree(clip_dir, tmp / "clip")
            break
        except (OSError, shutil.Error):
            if attempt == 4:
                raise
            time.sleep(2.0)
    for path in extra or []:
        shutil.copy2(path, tmp / path.name)
    if provenance is not None:
        (tmp / "training.json").write_text(json.dumps(provenance, indent=1) + "\n")
    replace_folder(tmp, output)


def train_unet(config: UnetTrainConfig, arch: ToyArchitecture, workdir: Path, output: Path, log: Callable[[str], None] = print,
               *, clip_name: str = "clip", stage_dir: str = "unet", init_from: str | None = None):
    """Train (or resume) the toy UNet, exporting the EMA pipeline to `output` at each checkpoint.

    Args:
        config: stage settings.
        arch: network sizes.
        workdir: the training folder (`toy-train`): reads `export/<clip_name>`, `export/vae`; writes `<stage_dir>/`.
        output: the pipeline folder to export to.
        clip_name: the CLIP export whose text tower conditions the UNet.
        stage_dir: the checkpoint folder under `workdir`.
        init_from: a checkpoint folder under `workdir` (e.g. "unet") whose newest weights and EMA
            start this run when `stage_dir` has no checkpoint yet (a warm start; fresh optimiser).
    """
    torch.manual_seed(config.seed)
    ckdir = workdir / stage_dir
    ckdir.mkdir(parents=True, exist_ok=True)
    # 1. frozen parts, fixed latents (shared by every UNet run on this VAE), schedule
    tok, text, vae = load_frozen(workdir, clip_name)
    latents = latent_pool(config, vae, workdir / "unet" / "latents.safetensors", log)
    scenes = pool_scenes(config)
    sched = build_scheduler()
    abar = sched.alphas_cumprod.float()
    cpl = None
    if config.coupled:  # the factor subspaces, fixed for the whole line (built once from the pool's latents)
        if not (ckdir / coupling.FILE).exists():
            coupling.from_latents(latents[:20_000], scenes[:20_000]).save(ckdir / coupling.FILE)
        cpl = coupling.load_coupling(ckdir / coupling.FILE)
    # 2. model, EMA, optimiser; resume
    unet = build_unet(arch)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, losses = 0, []
    warm_from = None
    ck = load_latest(ckdir)
    if ck is not None:
        was = bool(ck.state.get("config", {}).get("coupled", False))
        if was != config.coupled:  # resuming a line with the other noise would silently change what it learns
            raise ValueError(f"{ckdir} was trained {'with' if was else 'without'} noise coupling; resume it "
                             f"{'with' if was else 'without'} --unet-coupled (or start another --unet-dir)")
        unet.load_state_dict(unprefixed("model", ck.tensors))
        ema.load_state_dict(unprefixed("ema", ck.tensors))
        restore_optimizer(opt, ck.tensors, ck.state["param_groups"])
        step = ck.state["step"]
        warm_from = ck.state.get("warm_start")
        log(f"unet: resumed at step {step}")
    elif init_from is not None:
        warm = load_latest(workdir / init_from)
        if warm is None:
            raise FileNotFoundError(f"no checkpoint to warm-start from in {workdir / init_from}")
        unet.load_state_dict(unprefixed("model", warm.tensors))
        ema.load_state_dict(unprefixed("ema", warm.tensors))
        log(f"unet: warm start from {init_from} step {warm.state['step']} (fresh optimiser)")
        warm_from = {"from": init_from, "step": warm.state["step"]}
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, pool {len(scenes)}")
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    # 3. train
    last_save, t0, done0 = time.time(), time.time(), step
    while step < config.steps:
        unet.train()
        for group in opt.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup)
        rng = step_rng(config.seed, step)
        idx = rng.choice(len(scenes), size=config.batch, replace=False)
        mentions = draw_mentions(rng, config.batch, config.p_mention)
        caps = captions_for([scenes[i] for i in idx], mentions)
        drop = rng.random(config.batch) < config.p_uncond
        caps = ["" if d else c for c, d in zip(caps, drop)]
        mentions[drop] = False
        with torch.no_grad():
            context = text(tokenize(tok, caps))[0]
        g = step_generator(config.seed, step)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        if config.coupled:
            names = list(FACTORS)
            noise = cpl.couple(noise, [scenes[i] for i in idx], [{names[j] for j in np.flatnonzero(row)} for row in mentions], g)
        t = torch.randint(0, len(abar), (config.batch,), generator=g)
        n_high = round(config.high_t_share * config.batch)
        if n_high:
            t[:n_high] = torch.randint(int(config.high_t_from * len(abar)), len(abar), (n_high,), generator=g)
        a = abar[t].sqrt()[:, None, None, None]
        s = (1 - abar[t]).sqrt()[:, None, None, None]
        v_target = a * noise - s * x0
        loss = F.mse_loss(unet(a * x0 + s * noise, t, context).sample, v_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))  # warm-up: early EMAs forget the random init
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        step += 1
        losses.append(loss.item())
        if step % 100 == 0:
            rate = (step - done0) / (time.time() - t0)
            log(f"unet step {step} loss {np.mean(losses[-100:]):.4f} {rate:.2f} steps/s")
        if time.time() - last_save > config.checkpoint_every_s or step == config.steps:
            tensors, groups = flatten_optimizer(opt)
            elapsed = (ck.state.get("elapsed_s", 0.0) if ck is not None else 0.0) + time.time() - t0
            save_checkpoint(ckdir, step, {**prefixed("model", unet.state_dict()), **prefixed("ema", ema.state_dict()), **tensors},
                            {"param_groups": groups, "config": asdict(config), "elapsed_s": elapsed, "warm_start": warm_from,
                             "recent_loss": float(np.mean(losses[-100:]))})
            export_pipeline(ema, tok, text, current_vae(workdir, vae, log), workdir / "export" / clip_name, output,
                            extra=[ckdir / coupling.FILE] if cpl is not None else [],
                            provenance={"unet_dir": stage_dir, "step": step, "clip": clip_name, "warm_start": warm_from,
                                        "coupled_noise": config.coupled})
            (ckdir / "exported.json").write_text(json.dumps({"step": step, "output": str(output), "time": time.time()}))
            log(f"unet: checkpoint and export at step {step}")
            last_save = time.time()
    return ema
