"""Textual inversion's optimisation: the denoising loss of the user's images, captioned with the new
token, minimised over the token's input embedding alone (Gal et al. 2022, Eq. 2). With D vectors
(the temporal extension of the prompt space, as Picasso and ProSpect use it), a sample at timestep t
trains the vector of t's group, floor(t * D / num_train_timesteps).

Each step draws `batch_size` images, a caption template each, a timestep uniform in
[0, num_train_timesteps) and fresh noise, all from (seed, step), so a resumed run continues the
very batches an uninterrupted one would have drawn. The model is frozen; AdamW moves the vector.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conceptkit import store
from conceptkit.diffusion import frozen, timestep_groups, training_target
from conceptkit.implant.token import LearnedToken

CHECKPOINT_EVERY = 50  # optimiser steps between checkpoints
CHECKPOINT_EVERY_S = 60.0  # ... or wall seconds, whichever comes first
TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a picture of a {}", "a close-up photo of a {}", "a good photo of a {}")
TOY_TEMPLATES = ("a {}",)  # the toy's captions are its own words only

Progress = Callable[..., None]


@dataclass(frozen=True)
class Batch:
    index: torch.Tensor  # (b,) image rows
    t: torch.Tensor  # (b,) timesteps
    noise: torch.Tensor  # (b, C, h, w)
    captions: list[str]


def draw(step: int, seed: int, n_images: int, batch_size: int, latent_shape, n_train: int, templates, token: str) -> Batch:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    index = torch.randint(0, n_images, (batch_size,), generator=g)
    t = torch.randint(0, n_train, (batch_size,), generator=g)
    noise = torch.randn((batch_size, *latent_shape), generator=g)
    which = torch.randint(0, len(templates), (batch_size,), generator=g)
    return Batch(index, t, noise, [templates[int(i)].format(token) for i in which])


def loss_at(model, learned: LearnedToken, latents: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The denoising loss of one batch, differentiable in the token's vector."""
    pipe, device = model.pipe, model.device
    if learned.vector.ndim == 2:  # one vector per timestep group: each caption takes its timestep's
        groups = timestep_groups(batch.t, learned.vector.shape[0], int(pipe.scheduler.config.num_train_timesteps))
        learned.rows = torch.from_numpy(groups)
    ids = pipe.tokenizer(batch.captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    states = pipe.text_encoder(ids)[0].to(pipe.unet.dtype)
    x0 = latents[batch.index].to(device, pipe.unet.dtype)
    noise = batch.noise.to(device, pipe.unet.dtype)
    t = batch.t.to(device)
    xt = pipe.scheduler.add_noise(x0, noise, t)
    out = pipe.unet(xt, t, encoder_hidden_states=states).sample
    return F.mse_loss(out.float(), training_target(pipe.scheduler, x0, noise, t).float())


def save_checkpoint(path: Path, learned: LearnedToken, opt: torch.optim.Optimizer, step: int, key: str, losses: list[float]) -> None:
    state = opt.state[learned.vector] if learned.vector in opt.state else {}
    tensors = {"vector": learned.vector.detach().float().cpu().contiguous(), "losses": torch.tensor(losses, dtype=torch.float64)}
    for name in ("exp_avg", "exp_avg_sq"):
        if name in state:
            tensors[name] = state[name].detach().float().cpu().contiguous()
    with store.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": key, "step": str(step)})


def load_checkpoint(path: Path, learned: LearnedToken, opt: torch.optim.Optimizer, key: str) -> tuple[int, list[float]]:
    """(the step to go on from, the losses so far); (0, []) without a checkpoint of this key."""
    from safetensors import safe_open

    if not path.is_file():
        return 0, []
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("key") != key:
        return 0, []
    tensors = load_file(str(path))
    with torch.no_grad():
        learned.vector.copy_(tensors["vector"].to(learned.vector.device))
    step = int(meta["step"])
    if "exp_avg" in tensors:
        opt.state[learned.vector] = {"step": torch.tensor(float(step)), "exp_avg": tensors["exp_avg"].to(learned.vector.device),
                                     "exp_avg_sq": tensors["exp_avg_sq"].to(learned.vector.device)}
    return step, [float(v) for v in tensors["losses"].tolist()]


def train(model, learned: LearnedToken, latents: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
          templates, checkpoint: Path, key: str, progress: Progress | None = None) -> list[float]:
    """Optimise the token's vector for `steps` steps (resuming from `checkpoint`); returns every step's loss."""
    pipe = model.pipe
    opt = torch.optim.AdamW([learned.vector], lr=lr, weight_decay=0.0)
    start, losses = load_checkpoint(checkpoint, learned, opt, key)
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    last_save = time.monotonic()
    with frozen(pipe.unet, pipe.vae, pipe.text_encoder):
        for step in range(start, steps):
            batch = draw(step, seed, len(latents), batch_size, latents.shape[1:], n_train, templates, learned.token)
            loss = loss_at(model, learned, latents, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(step + 1, steps, loss=losses[-1])
            done = step + 1
            if done < steps and (done % CHECKPOINT_EVERY == 0 or time.monotonic() - last_save >= CHECKPOINT_EVERY_S):
                save_checkpoint(checkpoint, learned, opt, done, key, losses)
                last_save = time.monotonic()
    return losses
