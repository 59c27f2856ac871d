"""The model-side steps of flow-matching transformers (FLUX.1, SD3), written once: x0 from a velocity,
FLUX's packed latents, prompt conditioning and one differentiable transformer call.

Rectified flow (Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 2) interpolates
x_t = (1 - sigma) x0 + sigma * noise, and the transformer predicts the velocity v = noise - x0;
so the clean estimate is x0 = x_t - sigma * v, and FlowMatchEulerDiscreteScheduler's step is
x_{next} = x_t + (sigma_next - sigma) * v. FLUX works on 2x2-packed latents, (B, h/2 * w/2, 4C);
everything conceptkit records or trains on is unpacked to the (B, C, h, w) latent grid first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from conceptkit.models.flow import has_guidance, pipeline_kwargs


def is_flow_scheduler(scheduler) -> bool:
    """A flow-matching scheduler (sigmas, no alphas_cumprod): FlowMatchEulerDiscreteScheduler and its kin."""
    return getattr(scheduler, "alphas_cumprod", None) is None and hasattr(scheduler, "sigmas")


def x0_from_velocity(velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0 = x_t - sigma * v (Esser et al. 2024, Eq. 1 with v = noise - x0).

    Args:
        velocity: the transformer's output, shaped like `sample`.
        sample: x_t.
        sigma: a float or (B,) noise levels in [0, 1].
    """
    if isinstance(sigma, torch.Tensor) and sigma.ndim:
        sigma = sigma.to(sample.device, sample.dtype).view(-1, *([1] * (sample.ndim - 1)))
    return sample - sigma * velocity


def sigma_of_last_step(scheduler) -> float:
    """The sigma the scheduler's latest `step` call stepped from (its step index has moved past it)."""
    return float(scheduler.sigmas[int(scheduler.step_index) - 1])


# ---------------------------------------------------------------- FLUX's packed latents


def is_packed(pipe) -> bool:
    return type(pipe).__name__ == "FluxPipeline"


def unpack(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX's (B, h/2 * w/2, 4C) packed latents as the (B, C, h, w) grid; other pipelines' latents as they are."""
    if not is_packed(pipe) or latents.ndim != 3:
        return latents
    return type(pipe)._unpack_latents(latents, height, width, pipe.vae_scale_factor)


def pack(pipe, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents in FLUX's packed layout (the inverse of `unpack`)."""
    if not is_packed(pipe):
        return latents
    b, c, h, w = latents.shape
    return type(pipe)._pack_latents(latents, b, c, h, w)


# ---------------------------------------------------------------- conditioning and the transformer


@dataclass(frozen=True)
class FlowConditioning:
    """Text conditioning of a flow transformer per prompt: FLUX (T5 states, pooled CLIP, text ids); SD3 with its uncond."""

    cond: torch.Tensor  # (P, L, D) encoder hidden states
    pooled: torch.Tensor  # (P, D') pooled projections
    uncond: torch.Tensor | None = None  # SD3 with CFG
    pooled_uncond: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None  # FLUX: (L, 3)


@torch.no_grad()
def flow_conditioning(model, prompts: Sequence[str], guidance: bool) -> FlowConditioning:
    """Prompt embeddings as the pipeline makes them (SD3: an empty negative prompt when `guidance`)."""
    pipe, device = model.pipe, model.device
    extra = pipeline_kwargs(pipe)
    if is_packed(pipe):
        pe, pooled, text_ids = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device, **extra)
        return FlowConditioning(pe, pooled, text_ids=text_ids)
    pe, npe, pooled, npooled = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=guidance, **extra)
    return FlowConditioning(pe, pooled, npe if guidance else None, npooled if guidance else None)


def flow_predict_x0(model, xt: torch.Tensor, t: torch.Tensor, cond: FlowConditioning, prompt_idx: torch.Tensor,
                    guidance: float) -> torch.Tensor:
    """The x0 estimate at harvested (x_t, t), guided as in sampling: x_t - sigma * v with sigma = t / 1000.

    A harvest keeps integer timesteps (sigma * 1000 rounded down), so sigma here is at most 0.001
    below the sampled one; the slider loss compares estimates at the same point with and without
    the slider, which this does not change.
    """
    sigma = t.to(model.device, torch.float32) / float(model.pipe.scheduler.config.num_train_timesteps)
    v = velocity(model, xt, sigma, cond, prompt_idx, guidance)
    return x0_from_velocity(v, xt.to(v.device, v.dtype), sigma)


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, cond: FlowConditioning, prompt_idx: torch.Tensor,
             guidance: float) -> torch.Tensor:
    """The (guided) velocity at x_t = `x`, differentiable: (N, C, h, w) in, (N, C, h, w) out.

    FLUX: one call with the embedded guidance scale (none for schnell); SD3: classifier-free guidance
    over [uncond; cond] when `cond.uncond` is set, as the pipelines do.

    Args:
        x: (N, C, h, w) latents on the grid.
        sigma: (N,) noise levels in [0, 1].
        cond: from `flow_conditioning`; prompt_idx: (N,) rows of it.
        guidance: the guidance scale.
    """
    pipe = model.pipe
    net = pipe.transformer
    dtype = net.dtype
    x = x.to(model.device, dtype)
    sigma = sigma.to(model.device, dtype)
    if is_packed(pipe):
        n, _, h, w = x.shape
        img_ids = type(pipe)._prepare_latent_image_ids(n, h // 2, w // 2, model.device, dtype)
        g = torch.full((n,), float(guidance), device=model.device, dtype=dtype) if has_guidance(pipe) else None
        out = net(hidden_states=pack(pipe, x), timestep=sigma, guidance=g, pooled_projections=cond.pooled[prompt_idx].to(dtype),
                  encoder_hidden_states=cond.cond[prompt_idx].to(dtype), txt_ids=cond.text_ids, img_ids=img_ids,
                  return_dict=False)[0]
        return unpack(pipe, out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
    t = sigma * pipe.scheduler.config.num_train_timesteps
    if cond.uncond is None:
        return net(hidden_states=x, timestep=t, encoder_hidden_states=cond.cond[prompt_idx].to(dtype),
                   pooled_projections=cond.pooled[prompt_idx].to(dtype), return_dict=False)[0]
    states = torch.cat([cond.uncond[prompt_idx], cond.cond[prompt_idx]]).to(dtype)
    pooled = torch.cat([cond.pooled_uncond[prompt_idx], cond.pooled[prompt_idx]]).to(dtype)
    out = net(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]), encoder_hidden_states=states,
              pooled_projections=pooled, return_dict=False)[0]
    un, co = out.chunk(2)
    return un + guidance * (co - un)
