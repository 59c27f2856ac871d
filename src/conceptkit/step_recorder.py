"""Recording a sampler: every scheduler step's input x_t, predicted x0 and timestep."""

from __future__ import annotations

import torch

from conceptkit.errors import UsageError


class StepRecorder:
    """Wraps a scheduler instance's `step` to keep x_t, x0 and t of every call.

    The pipelines call `scheduler.step(..., return_dict=False)[0]` and drop the x0 estimate;
    this asks for the full output instead (DDIM, DDPM, Euler give `pred_original_sample`,
    LCM gives `denoised`) and computes x0 from the model output where a scheduler gives none.
    """

    def __init__(self, scheduler, keep_xt: bool):
        self.scheduler = scheduler
        self.keep_xt = keep_xt
        self.timesteps: list[int] = []
        self.x0: list[torch.Tensor] = []
        self.xt: list[torch.Tensor] = []

    def __enter__(self) -> StepRecorder:
        original = self.scheduler.step

        def step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            out = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
            x0 = getattr(out, "pred_original_sample", None)
            if x0 is None:
                x0 = getattr(out, "denoised", None)
            if x0 is None:
                x0 = self._x0_from_output(model_output, timestep, sample)
            self.timesteps.append(int(timestep))
            self.x0.append(x0.detach())
            if self.keep_xt:
                self.xt.append(sample.detach())
            return out if return_dict else (out.prev_sample,)

        self.scheduler.step = step
        return self

    def __exit__(self, *exc) -> None:
        del self.scheduler.step  # drop the instance attribute: the class method shows again

    def _x0_from_output(self, model_output, timestep, sample) -> torch.Tensor:
        config = self.scheduler.config
        alphas = getattr(self.scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise UsageError(f"cannot read x0 from scheduler {type(self.scheduler).__name__}; use DDIM, DDPM, Euler or LCM")
        a = alphas.to(sample.device)[int(timestep)].to(sample.dtype)
        kind = config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
        if kind == "v_prediction":
            return a.sqrt() * sample - (1 - a).sqrt() * model_output
        return model_output
