"""Stage 2: train the toy `AutoencoderKL` (32x32x3 <-> 8x8x4) on the world's images.

Reconstruction loss (MSE + L1) plus a small KL term, as in the KL-regularised autoencoder of
Rombach et al. (2022), Sec. 3 (without the perceptual and adversarial terms). After training,
`scaling_factor` is set to 1 / std of the latents of a held-out pool, so scaled latents have unit
variance for the diffusion model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from conceptkit.toy.analyse import analyse_batch
from conceptkit.toy.checkpoint import flatten_optimizer, load_latest, prefixed, restore_optimizer, save_checkpoint, unprefixed
from conceptkit.toy.data import make_pool, step_generator, step_rng, signed_to_uint8
from conceptkit.toy.model import ToyArchitecture, build_vae
from conceptkit.toy.world import FACTORS


@dataclass(frozen=True)
class VaeTrainConfig:
    """Settings of the VAE stage."""

    steps: int = 1800  # optimiser steps
    batch: int = 32
    lr: float = 2e-3  # AdamW peak learning rate, cosine decay after warm-up
    warmup: int = 100
    kl_weight: float = 1e-4  # weight of the per-element KL term
    l1_weight: float = 0.5  # weight of the L1 term next to the MSE
    pool: int = 60_000  # fixed training images
    seed: int = 0
    checkpoint_every_s: float = 120.0
    decoder_only: bool = False  # train only the decoder: the latent space (and scaling factor) stays fixed

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch <= 0 or self.pool < self.batch:
            raise ValueError("need steps > 0, batch > 0 and pool >= batch")
        if self.kl_weight < 0 or self.l1_weight < 0:
            raise ValueError("loss weights must be non-negative")


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Unscaled latent means (the posterior mode).

    Args:
        images: (N, 3, 32, 32) in [-1, 1].
    Returns:
        (N, 4, 8, 8) float32.
    """
    return torch.cat([vae.encode(c).latent_dist.mode() for c in images.split(chunk)])


@torch.no_grad()
def reconstruction_report(vae, n: int = 1000, seed: int = 12345) -> dict[str, float]:
    """How well the analyser reads VAE reconstructions of fresh images: per-factor accuracy, validity, MSE."""
    pool = make_pool(n, seed)
    rec = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in pool.images.split(500)])
    readings = analyse_batch(signed_to_uint8(rec))
    out = {"valid": float(np.mean([r.valid for r in readings])), "mse": float(F.mse_loss(rec, pool.images))}
    for j, name in enumerate(FACTORS):
        out[name] = float(np.mean([r.valid and r.factors[name] == FACTORS[name][pool.factors[i, j]] for i, r in enumerate(readings)]))
    return out


def train_vae(config: VaeTrainConfig, arch: ToyArchitecture, workdir: Path, log: Callable[[str], None] = print, init=None):
    """Train (or resume) the toy VAE and set its scaling factor; returns the `AutoencoderKL`.

    Args:
        config: stage settings.
        arch: network sizes.
        workdir: checkpoint folder of this stage (`toy-train/vae`).
        init: optional `AutoencoderKL` to start from (needed for `decoder_only`).
    """
    torch.manual_seed(config.seed)
    # 1. model, optimiser, fixed pool
    if config.decoder_only and init is None:
        raise ValueError("decoder_only needs a trained VAE to start from")
    vae = build_vae(arch) if init is None else init
    if config.decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / config.warmup) * 0.5 * (1 + np.cos(np.pi * min(s, config.steps) / config.steps)))
    pool = make_pool(config.pool, seed=config.seed + 2)
    step = 0
    # 2. resume
    ck = load_latest(workdir)
    if ck is not None:
        vae.load_state_dict(unprefixed("model", ck.tensors))
        restore_optimizer(opt, ck.tensors, ck.state["param_groups"])
        step = ck.state["step"]
        sched.last_epoch = step - 1
        sched.step()
        log(f"vae: resumed at step {step}")
    # 3. train
    last_save, t0, done0 = time.time(), time.time(), step
    while step < config.steps:
        vae.train()
        x = pool.images[step_rng(config.seed, step).choice(config.pool, size=config.batch, replace=False)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=step_generator(config.seed, step))
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = F.mse_loss(rec, x) + config.l1_weight * F.l1_loss(rec, x) + config.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 100 == 0:
            log(f"vae step {step} loss {loss.item():.5f} kl {kl.item():.3f} {(step - done0) / (time.time() - t0):.2f} steps/s")
        if time.time() - last_save > config.checkpoint_every_s or step == config.steps:
            tensors, groups = flatten_optimizer(opt)
            save_checkpoint(workdir, step, {**prefixed("model", vae.state_dict()), **tensors},
                            {"param_groups": groups, "config": asdict(config), "elapsed_s": time.time() - t0})
            last_save = time.time()
    # 4. scaling factor from the latent std of a held-out pool
    vae.eval()
    if config.decoder_only:
        return vae
    std = float(encode_latents(vae, make_pool(4000, seed=config.seed + 3).images).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"vae: latent std {std:.4f} -> scaling_factor {1.0 / std:.4f}")
    return vae
