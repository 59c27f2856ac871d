"""Recording a sampler: every scheduler step's input x_t, predicted x0 and timestep."""

from __future__ import annotations

import torch

from conceptkit.diffusion import x0_from_output
from conceptkit.diffusion_flow import is_flow_scheduler, sigma_of_last_step, x0_from_velocity


class StepRecorder:
    """Wraps a scheduler instance's `step` to keep x_t, x0 and t of every call.

    The pipelines call `scheduler.step(..., return_dict=False)[0]` and drop the x0 estimate;
    this asks for the full output instead (DDIM, DDPM, Euler give `pred_original_sample`,
    LCM gives `denoised`) and computes x0 from the model output where a scheduler gives none;
    for flow matching (FLUX, SD3) x0 = x_t - sigma * v with the sigma the step stepped from, kept in `sigmas`.
    """

    def __init__(self, scheduler, keep_xt: bool):
        self.scheduler = scheduler
        self.keep_xt = keep_xt
        self.timesteps: list[int] = []
        self.x0: list[torch.Tensor] = []
        self.xt: list[torch.Tensor] = []
        self.sigmas: list[float] = []  # flow-matching schedulers only

    def __enter__(self) -> StepRecorder:
        original = self.scheduler.step

        def step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            out = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
            x0 = getattr(out, "pred_original_sample", None)
            if x0 is None:
                x0 = getattr(out, "denoised", None)
            if x0 is None and is_flow_scheduler(self.scheduler):
                self.sigmas.append(sigma_of_last_step(self.scheduler))
                x0 = x0_from_velocity(model_output, sample, self.sigmas[-1])
            if x0 is None:
                x0 = x0_from_output(self.scheduler, model_output, sample, timestep)
            self.timesteps.append(int(timestep))
            self.x0.append(x0.detach())
            if self.keep_xt:
                self.xt.append(sample.detach())
            return out if return_dict else (out.prev_sample,)

        self.scheduler.step = step
        return self

    def __exit__(self, *exc) -> None:
        del self.scheduler.step  # drop the instance attribute: the class method shows again
