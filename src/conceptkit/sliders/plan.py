"""What a `sliders` run will do and roughly cost, before it starts (`sliders --dry-run`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from conceptkit import capacity
from conceptkit.harvest import HarvestConfig
from conceptkit.models.flow import native_size
from conceptkit.sliders.calibrate import batches_to_sample
from conceptkit.sliders.train import encode_conditioning, predict_x0


@dataclass(frozen=True)
class Plan:
    """The run's sizes, the harvest's disk size and a time estimate from one measured UNet call."""

    trajectories: int
    steps: int  # denoising steps per trajectory
    guidance: float
    latent_shape: tuple[int, int, int]  # (C, h, w)
    harvest_bytes: int  # x0 and x_t of every step, float16
    pca_memory_bytes: int  # the harvest held in float32 for the PCA
    sliders: int
    train_steps: int
    pairs: int
    batch: int  # trajectories per measured UNet call (the harvest's batch)
    unet_call_s: float  # one measured guided UNet call on `batch` latents
    harvest_s: float  # estimate: one call per batch and step
    train_s: float  # estimate: per training step one batched pass (slider-free + every slider and sign), backward included
    calibration_s: float  # estimate: the calibration's sampling (`sliders.calibrate`), one call per batch and step

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def latent_shape(model, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    pipe = model.pipe
    scale = getattr(pipe, "vae_scale_factor", 8)
    side = native_size(pipe) // scale  # FLUX / SD3 included: the latent grid, not FLUX's packed tokens
    h = (height // scale) if height else side
    w = (width // scale) if width else side
    return int(pipe.vae.config.latent_channels), h, w


def measure_unet_call(model, prompt: str, guidance: float, shape: tuple[int, int, int], batch: int, repeats: int = 2) -> float:
    """Seconds of one guided UNet call on `batch` latents (the best of `repeats`, after a warm-up)."""
    c, h, w = shape
    scale = getattr(model.pipe, "vae_scale_factor", 8)
    cond = encode_conditioning(model, [prompt], guidance, (h * scale, w * scale))
    xt = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0))
    t = model.pipe.scheduler.config.num_train_timesteps // 2
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            predict_x0(model, xt, torch.full((batch,), t), cond, torch.zeros(batch, dtype=torch.long), guidance)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up
                best = min(best, time.perf_counter() - start)
    return best


def make_plan(model, prompt: str, samples: int, steps: int | None, guidance: float | None, count: int,
              train_steps: int, pairs: int, symmetric: bool = True, batch_size: int = 8, calibration_seeds: int = 0) -> Plan:
    """The plan, timed by one guided UNet call at the harvest's batch size; other batches scale linearly."""
    steps = steps or model.default_steps
    guidance = model.default_guidance if guidance is None else guidance
    shape = latent_shape(model)
    batch = min(batch_size, samples)
    call = measure_unet_call(model, prompt, guidance, shape, batch)
    disk = capacity.harvest_bytes(model, HarvestConfig(prompts=(prompt,), samples=samples, steps=steps,
                                                       guidance=guidance).resolved(model), samples)
    train_batch = pairs * (1 + (2 if symmetric else 1) * count)  # the slider-free rows and every slider and sign
    return Plan(
        trajectories=samples, steps=steps, guidance=guidance, latent_shape=shape,
        harvest_bytes=disk,
        pca_memory_bytes=2 * disk,  # float16 on disk, float32 in memory
        sliders=count, train_steps=train_steps, pairs=pairs, batch=batch, unet_call_s=round(call, 4),
        harvest_s=round(-(-samples // batch) * steps * call, 1),
        # backward costs about twice a forward pass; decoding and embedding x0 are left out
        train_s=round(train_steps * 3 * call * max(1.0, train_batch / batch), 1),
        calibration_s=round(batches_to_sample(count) * steps * call * max(1.0, calibration_seeds / batch), 1)
        if calibration_seeds else 0.0,
    )
