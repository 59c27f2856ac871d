"""`toy-turbo`: the few-step student of the toy, distilled by distribution matching (DMD2).

The maths of the distillation, model-free where it can be: the few-step schedule, sampling the
student with backward simulation, the distribution-matching gradient (Yin et al. (2024), DMD, Sec. 3; DMD2, Yin et al. (2024b): no
regression loss, a two-time-scale critic, a multi-step generator trained on its own
backward-simulated inputs), and the export as a diffusers
pipeline folder that shares the teacher's VAE, text tower and tokenizer through symlinks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from conceptkit.errors import ModelNotFoundError
from conceptkit.toy.checkpoint import replace_folder
from conceptkit.toy.model import weights_path

TIMESTEPS = (999, 749, 499, 249)  # the student's 4-step schedule; 1, 2, 3 steps use 999 / 999, 499 / 999, 749, 499
SHARED = ("vae", "text_encoder", "tokenizer")  # components taken from the teacher, as symlinks
STEPS, GUIDANCE = 1, 0.0  # what the loader picks for a "turbo" name (`conceptkit.models.load`): one step, no CFG


def turbo_path() -> Path:
    """The folder of the shipped `toy-turbo` pipeline (inside the teacher's `weights/`)."""
    return weights_path() / "turbo"


def build_turbo_scheduler():
    """An `LCMScheduler` on the teacher's cosine schedule whose 1-4 step timesteps are `TIMESTEPS`' prefixes.

    LCM's multistep sampling (x0 from the model, then fresh noise to the next timestep) is the
    sampler DMD2's multi-step generator is trained for; `original_inference_steps=4` makes
    `set_timesteps(n)` pick (999,), (999, 499), (999, 749, 499), (999, 749, 499, 249).
    """
    from diffusers import LCMScheduler

    return LCMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        original_inference_steps=len(TIMESTEPS), clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="trailing",
    )


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(abar) x_t - sqrt(1 - abar) v (Salimans & Ho (2022), Sec. 4).

    Args:
        x_t: (B, C, H, W) noisy latents.
        v: (B, C, H, W) v-prediction.
        abar_t: (B,) cumulative alphas at each sample's timestep.
    """
    a = abar_t.sqrt()[:, None, None, None]
    s = (1 - abar_t).sqrt()[:, None, None, None]
    return a * x_t - s * v


def add_noise(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) noise; shapes as in `x0_from_v`."""
    return abar_t.sqrt()[:, None, None, None] * x0 + (1 - abar_t).sqrt()[:, None, None, None] * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar) noise - sqrt(1 - abar) x0, the teacher's training target."""
    return abar_t.sqrt()[:, None, None, None] * noise - (1 - abar_t).sqrt()[:, None, None, None] * x0


def student_input(student, context: torch.Tensor, noise: torch.Tensor, k: int, abar: torch.Tensor,
                  generator: torch.Generator, timesteps: tuple[int, ...] = TIMESTEPS) -> torch.Tensor:
    """The student's input at its k-th step, by backward simulation without gradients (DMD2's multi-step generator).

    Runs the student's own few-step sampler from `noise` for k steps: x0 from the student, fresh
    noise to the next timestep (as `LCMScheduler` samples).

    Args:
        student: the generator UNet (v-prediction).
        context: (B, L, D) text-tower hidden states.
        noise: (B, C, H, W) starting noise at `timesteps[0]`.
        k: how many steps to simulate (0 returns `noise`).
        abar: (T,) cumulative alphas.
        generator: the torch generator of the fresh noise.
    """
    x = noise
    with torch.no_grad():
        for j in range(k):
            t = torch.full((x.shape[0],), timesteps[j], dtype=torch.long)
            x0 = x0_from_v(x, student(x, t, context).sample, abar[t])
            nxt = torch.full((x.shape[0],), timesteps[j + 1], dtype=torch.long)
            x = add_noise(x0, torch.randn(x.shape, generator=generator), abar[nxt])
    return x


def dmd_gradient(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """The distribution-matching gradient of KL(p_student || p_teacher) w.r.t. the student's samples.

    DMD (Yin et al. (2024), Sec. 3): s_fake - s_real, expressed through the two denoisers' x0
    estimates at the same noisy point, normalised per sample by the mean |x0 - real_x0|.

    Args:
        x0: (B, C, H, W) the student's samples.
        real_x0: (B, C, H, W) the teacher's x0 estimate (with guidance) at the noised samples.
        fake_x0: (B, C, H, W) the critic's x0 estimate at the same points.
    Returns:
        (B, C, H, W): a step of gradient descent moves x0 by -gradient, i.e. toward real_x0 - fake_x0.
    """
    p_real = x0 - real_x0
    p_fake = x0 - fake_x0
    weight = p_real.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    return (p_real - p_fake) / weight


def dmd_loss(x0: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """0.5 ||x0 - sg(x0 - gradient)||^2 (mean): its gradient w.r.t. x0 is gradient / numel (DMD's surrogate)."""
    return 0.5 * F.mse_loss(x0, (x0 - gradient).detach())


@torch.no_grad()
def guided_x0(unet, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
              abar: torch.Tensor, guidance: float) -> torch.Tensor:
    """The teacher's x0 estimate with classifier-free guidance (Ho & Salimans (2022)) on v.

    Args:
        unet: the teacher UNet.
        x_t: (B, C, H, W); t: (B,) timesteps; context: (B, L, D); uncond: (B, L, D) the "" context.
        guidance: w, v = v_u + w (v_c - v_u); 1 is plain conditional.
    """
    if guidance == 1.0:
        v = unet(x_t, t, context).sample
    else:
        both = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, context])).sample
        v_u, v_c = both.chunk(2)
        v = v_u + guidance * (v_c - v_u)
    return x0_from_v(x_t, v, abar[t])


def export_turbo(student, teacher: Path, output: Path, provenance: dict | None = None) -> None:
    """Save the student as a `StableDiffusionPipeline` folder at `output`, atomically.

    Only `unet/`, `scheduler/` and `model_index.json` are written; `vae/`, `text_encoder/` and
    `tokenizer/` are relative symlinks to the teacher's folder, so the package grows by one UNet.

    Args:
        student: the generator UNet.
        teacher: the teacher's pipeline folder (its `model_index.json` is the template).
        output: the folder to write.
    """
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student.save_pretrained(tmp / "unet", safe_serialization=True)
    build_turbo_scheduler().save_pretrained(tmp / "scheduler")
    index = json.loads((Path(teacher) / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name in SHARED:
        target = os.path.relpath(Path(teacher).resolve() / name, output.parent.resolve() / output.name)
        os.symlink(target, tmp / name, target_is_directory=True)
    if provenance is not None:
        (tmp / "training.json").write_text(json.dumps(provenance, indent=1) + "\n")
    replace_folder(tmp, output)


def turbo_folder() -> Path:
    """The shipped `toy-turbo` folder, or `ModelNotFoundError` saying how to train it."""
    folder = turbo_path()
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"the toy-turbo weights are missing ({folder}); distil them with `python -m conceptkit.toy.train --stages turbo`"
        )
    return folder
