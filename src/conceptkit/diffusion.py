"""The model-side steps every method shares, written once: prompt conditioning (SD and SDXL),
x0 from a model output and the training target by prediction type, the VAE both ways, seeded
generators, frozen weights, the same-weights check, and sampling with modifications.

A modification is anything with `set_step(i, n)` (called before denoising step i of n), `remove()`
and `describe() -> dict`: sliders (`sliders.apply`), Picasso sub-concepts (`picasso.subconcepts`)
and other people's LoRA files (`sliders.lora_import`). `sample` steps them along the denoising loop
through the pipeline's own `callback_on_step_end`, so the current step is known one way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from conceptkit.errors import UsageError
from conceptkit.models.flow import pipeline_kwargs

# ---------------------------------------------------------------- seeds


def generators(device: torch.device, seeds: Iterable[int]) -> list[torch.Generator]:
    """One seeded generator per image; on MPS they live on the CPU (MPS generators are not reproducible)."""
    where = "cpu" if torch.device(device).type == "mps" else device
    return [torch.Generator(where).manual_seed(int(s)) for s in seeds]


# ---------------------------------------------------------------- frozen weights


def save_requires_grad(params: Iterable[torch.nn.Parameter]) -> list[tuple[torch.nn.Parameter, bool]]:
    """The parameters' requires_grad flags, to give back with `restore_requires_grad`."""
    return [(p, p.requires_grad) for p in params]


def restore_requires_grad(saved: Iterable[tuple[torch.nn.Parameter, bool]]) -> None:
    for p, flag in saved:
        p.requires_grad_(flag)


@contextmanager
def frozen(*modules: torch.nn.Module | None) -> Iterator[None]:
    """No gradients for the modules' weights inside the block; their own flags come back after it."""
    saved = save_requires_grad(p for m in modules if m is not None for p in m.parameters())
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        restore_requires_grad(saved)


# ---------------------------------------------------------------- prediction types


def _alpha_bar(scheduler, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise UsageError(f"cannot read x0 from scheduler {type(scheduler).__name__}; use DDIM, DDPM, Euler or LCM")
    if isinstance(t, torch.Tensor) and t.ndim:
        return alphas.to(like.device)[t.long()].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return alphas.to(like.device)[int(t)].to(like.dtype)


def x0_from_output(scheduler, output: torch.Tensor, sample: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """The clean-image estimate from the UNet's output at (x_t = `sample`, t), by the scheduler's prediction type."""
    a = _alpha_bar(scheduler, t, sample)
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return (sample - (1 - a).sqrt() * output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * output
    return output


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet should output at x_t = add_noise(x0, noise, t): the inverse of `x0_from_output`."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


# ---------------------------------------------------------------- the VAE


def decode(model, latents: torch.Tensor) -> torch.Tensor:
    """Differentiable VAE decode: (N, C, h, w) scaled latents -> (N, 3, H, W) images in [0, 1] (fp32)."""
    vae = model.pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # FLUX / SD3 VAEs: latents are (z - shift) * scale
    img = vae.decode(latents.to(model.device, vae.dtype) / vae.config.scaling_factor + shift).sample.float()
    return ((img + 1) / 2).clamp(0, 1)


@torch.inference_mode()
def decode_batched(model, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """`decode` in chunks without gradients; the images come back on the CPU."""
    images = [decode(model, chunk).cpu() for chunk in latents.split(batch_size)]
    return torch.cat(images) if images else torch.empty(0)


@torch.no_grad()
def encode(model, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] -> scaled latents (posterior mean), fp32 on the CPU."""
    vae = model.pipe.vae
    out = [vae.encode(c.to(model.device, vae.dtype)).latent_dist.mean for c in images.split(batch_size)]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (torch.cat(out).float().cpu() - shift) * vae.config.scaling_factor


# ---------------------------------------------------------------- conditioning


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of the UNet for each prompt: (P, L, D) cond and uncond, SDXL extras."""

    cond: torch.Tensor
    uncond: torch.Tensor | None  # None: no classifier-free guidance
    added_cond: dict | None = None  # SDXL: {"text_embeds": (P, ...), "time_ids": (P, 6)} for [cond]
    added_uncond: dict | None = None


def sdxl_time_ids(height: int, width: int, n: int, device, dtype) -> torch.Tensor:
    """SDXL's micro-conditioning (original size, crop (0, 0), target size) for n images: (n, 6)."""
    return torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype).repeat(n, 1)


@torch.no_grad()
def conditioning(model, prompts: Sequence[str], height: int, width: int, guidance: bool, timestep: int | None = None) -> Conditioning:
    """Prompt embeddings as the pipeline makes them (empty negative prompt when `guidance`).

    With `timestep`, a learned word whose vector changes with the timestep (`model.tokens_in_time`)
    takes its vector for that timestep's group; without, the mean its table row holds.
    """
    pipe, device = model.pipe, model.device
    with token_rows(model, timestep):
        out = pipe.encode_prompt(prompt=list(prompts), device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=guidance, negative_prompt=None)
    if model.arch != "sdxl":
        pe, npe = out[0], out[1]
        return Conditioning(pe, npe if guidance else None)
    pe, npe, pooled, npooled = out
    ids = sdxl_time_ids(height, width, len(prompts), device, pe.dtype)
    return Conditioning(pe, npe if guidance else None, {"text_embeds": pooled, "time_ids": ids},
                        {"text_embeds": npooled, "time_ids": ids} if guidance else None)


def token_groups(model, timestep: int) -> tuple[int, ...]:
    """The timestep group of each learned word in time (each with its own D)."""
    n_train = int(model.pipe.scheduler.config.num_train_timesteps)
    return tuple(int(timestep_groups([timestep], len(vectors), n_train)[0]) for _, vectors in model.tokens_in_time)


def _tower_rows(model, rows: Sequence[tuple[Any, torch.Tensor]]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(table, token id, vector) per text tower of each (token id, vector) of `rows`. On SDXL the id
    is (CLIP-L id, OpenCLIP-G id) and the vector both towers' vectors end to end."""
    pipe = model.pipe
    tables = [e.get_input_embeddings().weight for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    out = []
    for ids, vector in rows:
        ids = ids if isinstance(ids, tuple) else (ids,)
        parts = vector.split([t.shape[1] for t in tables[:len(ids)]], dim=-1)
        out += [(table, int(i), v) for table, i, v in zip(tables, ids, parts, strict=True)]
    return out


@contextmanager
def _table_rows(model, rows: Sequence[tuple[Any, torch.Tensor]]) -> Iterator[None]:
    """Inside the block, each (token id, vector) of `rows` is that token's embedding row; the rows come back after."""
    rows = _tower_rows(model, rows)
    saved = [(table, token_id, table[token_id].detach().clone()) for table, token_id, _ in rows]
    try:
        with torch.no_grad():
            for table, token_id, vector in rows:
                table[token_id] = vector.to(table.device, table.dtype)
        yield
    finally:
        with torch.no_grad():
            for table, token_id, row in saved:
                table[token_id] = row


@contextmanager
def token_rows(model, timestep: int | None) -> Iterator[None]:
    """Inside the block, each learned word in time has its vector for `timestep` in the embedding table."""
    if timestep is None or not model.tokens_in_time:
        yield
        return
    groups = token_groups(model, timestep)
    with _table_rows(model, [(token_id, vectors[g]) for (token_id, vectors), g in zip(model.tokens_in_time, groups)]):
        yield


class _WordsInTime:
    """A UNet pre-hook for sampling with learned words in time: the prompt rows of the UNet's text
    conditioning (the last len(prompts) rows: the pipeline's batch is [uncond; cond] with guidance)
    are re-encoded with each word's vector for the current timestep's group (on SDXL both towers,
    and the pooled `text_embeds` rows with them)."""

    def __init__(self, model, prompts: Sequence[str]):
        self.model, self.prompts, self.n = model, list(prompts), len(prompts)
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.handle = model.pipe.unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = int(t.flatten()[0]) if isinstance(t, torch.Tensor) else int(t)
        groups = token_groups(self.model, t)
        if groups not in self.cache:
            self.cache[groups] = conditioning(self.model, self.prompts, 0, 0, guidance=False, timestep=t)
        states, cond = kwargs["encoder_hidden_states"], self.cache[groups]
        kwargs = {**kwargs, "encoder_hidden_states": torch.cat([states[:states.shape[0] - self.n], cond.cond.to(states.dtype)])}
        added = kwargs.get("added_cond_kwargs")
        if added and cond.added_cond:  # SDXL: the pooled embedding of the same prompts, with the same vectors
            pooled = added["text_embeds"]
            kwargs["added_cond_kwargs"] = {**added, "text_embeds": torch.cat([pooled[:pooled.shape[0] - self.n],
                                                                               cond.added_cond["text_embeds"].to(pooled.dtype)])}
        return args, kwargs

    def remove(self) -> None:
        self.handle.remove()


@contextmanager
def words_in_layers(model, prompts: Sequence[str]) -> Iterator[None]:
    """Inside the block, every cross-attention layer sees a learned word in layers
    (`model.tokens_in_layers`, `implant --method xti`) with that layer's vector.

    The UNet's text conditioning is made with the word's mean vector (its table row); each layer's
    pre-hook replaces the rows that are one of `prompts` encoded that way by the same prompt encoded
    with the layer's vector. Rows of other text (the empty negative prompt) stay as they are. On
    SDXL the layers' states hold both towers' encodings with the layer's vectors, and the pooled
    `text_embeds`, which no cross-attention layer sees, stays the mean vector's (as in training).
    """
    if not model.tokens_in_layers:
        yield
        return
    unet = model.pipe.unet
    names = cross_attention_names(unet)
    plain = conditioning(model, prompts, 0, 0, guidance=False).cond  # (P, L, d)
    per_layer = []  # per layer: the prompts encoded with its vector, (P, L, d)
    for g in range(len(names)):
        with _table_rows(model, [(token_id, vectors[g]) for token_id, vectors in model.tokens_in_layers]):
            per_layer.append(conditioning(model, prompts, 0, 0, guidance=False).cond)

    def hook_for(g: int):
        def hook(_module, args, kwargs):
            states = kwargs.get("encoder_hidden_states")
            if states is None:
                return None
            # which prompt each row is (one comparison of every row with every prompt), then that prompt's row for layer g
            close = ((states[:, None] - plain[None].to(states.dtype)).abs().flatten(2).amax(-1) <= 1e-4)  # (B, P)
            which = close.float().argmax(1)
            swapped = per_layer[g].to(states.dtype)[which]
            return args, {**kwargs, "encoder_hidden_states": torch.where(close.any(1)[:, None, None], swapped, states)}
        return hook

    handles = [unet.get_submodule(name).register_forward_pre_hook(hook_for(g), with_kwargs=True) for g, name in enumerate(names)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def learned_words(model, prompts: Sequence[str]) -> Iterator[None]:
    """Around a pipeline call on `prompts` (one per image): learned words in time and in layers take
    their step's and their layer's vectors (nothing to do for a model without them)."""
    words = _WordsInTime(model, prompts) if model.tokens_in_time else None
    try:
        with words_in_layers(model, sorted(set(prompts))):
            yield
    finally:
        if words is not None:
            words.remove()


# ---------------------------------------------------------------- the same weights


def same_weights(identity: dict[str, Any] | None, model) -> bool:
    """Was an artifact (its manifest's `model` record) made with exactly these weights?"""
    return (identity or {}).get("fingerprint") == model.fingerprint


# ---------------------------------------------------------------- the UNet's layers


def cross_attention_names(unet) -> list[str]:
    """Module names of the UNet's cross-attention layers (`...attn2`), in module order."""
    return [name for name, _ in unet.named_modules() if name.endswith(".attn2")]


# ---------------------------------------------------------------- the denoising steps


def timestep_groups(timesteps, D: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Group of each timestep, floor(t * D / num_train_timesteps) clipped to [0, D-1] (ProSpect, Zhang et al. 2023).

    With D = 10 and 1000 training steps, t = 0..99 -> 0, ..., t = 900..999 -> 9.

    Args:
        timesteps: (T,) scheduler timesteps (ints or floats, any order).
        D: number of groups, >= 1.
        num_train_timesteps: the scheduler's training horizon.

    Returns:
        (T,) int64 group ids.
    """
    if int(D) != D or D < 1:
        raise UsageError(f"D (the number of timestep groups) must be a positive integer, got {D}")
    if num_train_timesteps <= 0:
        raise UsageError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
    if hasattr(timesteps, "detach"):
        timesteps = timesteps.detach().cpu().numpy()
    t = np.asarray(timesteps, dtype=np.float64)
    g = np.floor(t * int(D) / num_train_timesteps).astype(np.int64)
    return np.clip(g, 0, int(D) - 1)


def window_steps(n_steps: int, start: float) -> int:
    """Index of the first of `n_steps` denoising steps a modification acts on from fraction `start` of
    them on (at least 0, at most n_steps - 1): SliderSpace's slider window."""
    return min(n_steps - 1, round(start * n_steps))


# ---------------------------------------------------------------- sampling


class Modification(Protocol):
    def set_step(self, i: int, n: int) -> None: ...
    def remove(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...


@torch.no_grad()
def sample(model, prompt: str, seeds: Sequence[int], steps: int, guidance: float, mods: Sequence[Modification] = ()) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for `seeds`, with `mods` stepped along the denoising loop."""
    pipe = model.pipe
    gens = generators(model.device, seeds)
    for m in mods:
        m.set_step(0, steps)

    def on_step_end(_pipe, i, _t, kwargs):
        for m in mods:
            m.set_step(i + 1, steps)
        return kwargs

    with learned_words(model, [prompt] * len(seeds)):
        out = pipe(prompt=[prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="pt", callback_on_step_end=on_step_end if mods else None, **pipeline_kwargs(pipe)).images
    return out.float().clamp(0, 1).cpu()
