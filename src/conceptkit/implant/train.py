"""Textual inversion's optimisation: the denoising loss of the user's images, captioned with the new
token, minimised over the token's input embedding alone (Gal et al. 2022, Eq. 2). With D vectors
(the temporal extension of the prompt space, as Picasso and ProSpect use it), a sample at timestep t
trains the vector of t's group, floor(t * D / num_train_timesteps). With one vector per
cross-attention layer (P+'s extended prompt space, Voynov et al. 2023), layer g of the UNet sees the
captions encoded with vector g. On SDXL both text towers' vectors are learned together; the pooled
embedding follows a sample's group under temporal, and is the mean vectors' under xti (no
cross-attention layer sees it; sampling does the same, `diffusion.words_in_layers`).

Each step draws `batch_size` images, a caption template each, a timestep uniform in
[0, num_train_timesteps) and fresh noise, all from (seed, step), so a resumed run continues the
very batches an uninterrupted one would have drawn. The model is frozen; AdamW moves the vector.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conceptkit import store
from conceptkit.diffusion import cross_attention_names, frozen, sdxl_time_ids, timestep_groups, training_target
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


def _suffix(i: int) -> str:
    return "" if i == 0 else f"_{i}"  # one tower keeps the plain names


def loss_at(model, learned, latents: torch.Tensor, batch: Batch, layers: bool = False) -> torch.Tensor:
    """The denoising loss of one batch, differentiable in the learned vectors (one per text tower;
    with `layers`, the (G, d) vectors are one per cross-attention layer, else one per timestep group)."""
    words = _words(learned)
    pipe, device = model.pipe, model.device
    if words[0].vector.ndim == 2 and not layers:  # one vector per timestep group: each caption takes its timestep's
        groups = torch.from_numpy(timestep_groups(batch.t, words[0].vector.shape[0], int(pipe.scheduler.config.num_train_timesteps)))
        for word in words:  # on SDXL both towers' vectors of the group, so the pooled embedding follows the group too
            word.rows = groups
    x0 = latents[batch.index].to(device, pipe.unet.dtype)
    noise = batch.noise.to(device, pipe.unet.dtype)
    t = batch.t.to(device)
    xt = pipe.scheduler.add_noise(x0, noise, t)
    if model.arch == "sdxl":  # both towers, the pooled embedding and SDXL's size conditioning
        captions, b = list(batch.captions), len(batch.captions)
        n_layers = words[0].vector.shape[0] if layers else 0
        if layers:  # the captions once per layer's vectors, then once with their mean (the pooled embedding's)
            for word in words:
                word.rows = torch.arange(n_layers + 1).repeat_interleave(b)
            captions = captions * (n_layers + 1)
        pe, _, pooled, _ = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
        pe = pe.to(pipe.unet.dtype)
        states = pe[: n_layers * b].view(n_layers, b, *pe.shape[1:])
        pe, pooled = pe[n_layers * b:], pooled[n_layers * b:]
        side = x0.shape[-1] * pipe.vae_scale_factor
        added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(side, side, len(t), device, pe.dtype)}
        with _layer_states(pipe.unet, states) if layers else nullcontext():
            out = pipe.unet(xt, t, encoder_hidden_states=pe, added_cond_kwargs=added).sample
    elif layers:  # one vector per cross-attention layer: the captions encoded once per layer, in one batch
        n_layers, b = words[0].vector.shape[0], len(batch.captions)
        words[0].rows = torch.arange(n_layers).repeat_interleave(b)
        ids = pipe.tokenizer(batch.captions * n_layers, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        states = pipe.text_encoder(ids)[0].to(pipe.unet.dtype).view(n_layers, b, *ids.shape[1:], -1)
        with _layer_states(pipe.unet, states):
            out = pipe.unet(xt, t, encoder_hidden_states=states.mean(0)).sample
    else:
        ids = pipe.tokenizer(batch.captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        states = pipe.text_encoder(ids)[0].to(pipe.unet.dtype)
        out = pipe.unet(xt, t, encoder_hidden_states=states).sample
    return F.mse_loss(out.float(), training_target(pipe.scheduler, x0, noise, t).float())


@contextmanager
def _layer_states(unet, states: torch.Tensor):
    """Cross-attention layer g sees text conditioning states[g] (every other input as it is)."""
    def hook_for(g):
        def hook(_module, args, kwargs):
            return args, {**kwargs, "encoder_hidden_states": states[g]}
        return hook

    handles = [unet.get_submodule(name).register_forward_pre_hook(hook_for(g), with_kwargs=True)
               for g, name in enumerate(cross_attention_names(unet))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _words(learned) -> list[LearnedToken]:
    return list(learned) if isinstance(learned, (list, tuple)) else [learned]


def save_checkpoint(path: Path, learned, opt: torch.optim.Optimizer, step: int, key: str, losses: list[float]) -> None:
    tensors = {"losses": torch.tensor(losses, dtype=torch.float64)}
    for i, word in enumerate(_words(learned)):
        tensors["vector" + _suffix(i)] = word.vector.detach().float().cpu().contiguous()
        state = opt.state[word.vector] if word.vector in opt.state else {}
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                tensors[name + _suffix(i)] = state[name].detach().float().cpu().contiguous()
    with store.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": key, "step": str(step)})


def load_checkpoint(path: Path, learned, opt: torch.optim.Optimizer, key: str) -> tuple[int, list[float]]:
    """(the step to go on from, the losses so far); (0, []) without a checkpoint of this key."""
    from safetensors import safe_open

    if not path.is_file():
        return 0, []
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("key") != key:
        return 0, []
    tensors = load_file(str(path))
    step = int(meta["step"])
    for i, word in enumerate(_words(learned)):
        with torch.no_grad():
            word.vector.copy_(tensors["vector" + _suffix(i)].to(word.vector.device))
        if "exp_avg" + _suffix(i) in tensors:
            opt.state[word.vector] = {"step": torch.tensor(float(step)),
                                      "exp_avg": tensors["exp_avg" + _suffix(i)].to(word.vector.device),
                                      "exp_avg_sq": tensors["exp_avg_sq" + _suffix(i)].to(word.vector.device)}
    return step, [float(v) for v in tensors["losses"].tolist()]


def train(model, learned, latents: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
          templates, checkpoint: Path, key: str, progress: Progress | None = None, layers: bool = False) -> list[float]:
    """Optimise the word's vectors (one per text tower) for `steps` steps, resuming from `checkpoint`;
    returns every step's loss."""
    pipe = model.pipe
    words = _words(learned)
    opt = torch.optim.AdamW([w.vector for w in words], lr=lr, weight_decay=0.0)
    start, losses = load_checkpoint(checkpoint, words, opt, key)
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    last_save = time.monotonic()
    with frozen(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        for step in range(start, steps):
            batch = draw(step, seed, len(latents), batch_size, latents.shape[1:], n_train, templates, words[0].token)
            loss = loss_at(model, words, latents, batch, layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(step + 1, steps, loss=losses[-1])
            done = step + 1
            if done < steps and (done % CHECKPOINT_EVERY == 0 or time.monotonic() - last_save >= CHECKPOINT_EVERY_S):
                save_checkpoint(checkpoint, words, opt, done, key, losses)
                last_save = time.monotonic()
    return losses
