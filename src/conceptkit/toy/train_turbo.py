"""Stage turbo: distil the shipped toy (the teacher) into `toy-turbo`, a 1-4 step student, with DMD2.

Recipe (Yin et al. (2024b), DMD2): the student and the critic ("fake score") both start
from the teacher's UNet; each step trains the critic to denoise the student's current samples
(v-prediction MSE), and every `gen_every`-th step also moves the student along the
distribution-matching gradient between the teacher's guided x0 and the critic's
(`turbo.dmd_gradient`). No data and no regression loss: captions only. The student's input at its
k-th step comes from its own backward simulation. Reverse KL is mode-seeking, so the student
keeps what a prompt names and narrows what it leaves open, as SDXL-DMD does.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from conceptkit.toy import turbo
from conceptkit.toy.checkpoint import flatten_optimizer, load_latest, prefixed, restore_optimizer, save_checkpoint, unprefixed
from conceptkit.toy.data import captions_for, draw_mentions, step_generator, step_rng
from conceptkit.toy.train_clip import tokenize
from conceptkit.toy.world import sample_scenes


@dataclass(frozen=True)
class TurboTrainConfig:
    """Settings of the turbo stage."""

    steps: int = 20_000  # critic steps (the run is meant to be stopped and resumed freely)
    batch: int = 32  # captions (and student samples) per step
    gen_every: int = 4  # the student moves every gen_every-th step (DMD2's two time-scale rule; it uses 5)
    lr_gen: float = 1e-4  # AdamW learning rate of the student
    lr_fake: float = 1e-4  # AdamW learning rate of the critic
    weight_decay: float = 0.01
    guidance: float = 3.0  # CFG scale of the teacher's score (the teacher's own default), folded into the student
    p_mention: float = 0.6  # probability a caption names a factor
    step_probs: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)  # which of the 4 student steps a batch trains (1, the default, most)
    t_min: int = 20  # DMD noise levels drawn uniformly in [t_min, t_max]; DMD2 uses 2%-98% of the schedule, we stop at
    # half (abar 0.49), where background and colour modes are already apart, so their shares are never rebalanced
    t_max: int = 500
    seed: int = 0
    checkpoint_every_s: float = 240.0  # wall seconds between checkpoints (and exports)

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch <= 0 or self.gen_every <= 0:
            raise ValueError("need steps, batch and gen_every > 0")
        if len(self.step_probs) != len(turbo.TIMESTEPS) or min(self.step_probs) < 0 or abs(sum(self.step_probs) - 1) > 1e-6:
            raise ValueError(f"step_probs must be {len(turbo.TIMESTEPS)} non-negative numbers summing to 1")
        if not 0 <= self.t_min < self.t_max < 1000:
            raise ValueError(f"need 0 <= t_min < t_max < 1000, got {self.t_min}, {self.t_max}")
        if not 0.0 <= self.p_mention <= 1.0 or self.guidance < 0 or min(self.lr_gen, self.lr_fake) <= 0:
            raise ValueError("p_mention in [0, 1], guidance >= 0 and positive learning rates")


def load_teacher(folder: Path):
    """(tokenizer, text encoder, UNet) of a teacher pipeline folder, frozen, in fp32."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"no teacher pipeline at {folder}")
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
    return tok, text, unet


def _abar() -> torch.Tensor:
    return turbo.build_turbo_scheduler().alphas_cumprod.float()


def train_step(config: TurboTrainConfig, step: int, student, fake, teacher, text, tok, uncond: torch.Tensor,
               opt_gen, opt_fake, abar: torch.Tensor) -> dict:
    """One step: the student (every `gen_every`-th step), then the critic. Pure function of (seed, step) and the state."""
    rng, g = step_rng(config.seed, step), step_generator(config.seed, step)
    # 1. captions and the student's step k
    scenes = sample_scenes(config.batch, seed=int(rng.integers(2**31)))
    caps = captions_for(scenes, draw_mentions(rng, config.batch, config.p_mention))
    k = int(rng.choice(len(turbo.TIMESTEPS), p=np.asarray(config.step_probs)))
    with torch.no_grad():
        context = text(tokenize(tok, caps))[0]
    unc = uncond.expand(config.batch, -1, -1)
    b = config.batch
    # 2. the student's input at step k (its own backward simulation), then its x0
    noise = torch.randn((b, *student_shape(student)), generator=g)
    x_t = turbo.student_input(student, context, noise, k, abar, g)
    t_k = torch.full((b,), turbo.TIMESTEPS[k], dtype=torch.long)
    out = {"k": k}
    if step % config.gen_every == config.gen_every - 1:
        # 3. distribution matching: noise the samples, compare teacher (guided) and critic denoisers
        x0 = turbo.x0_from_v(x_t, student(x_t, t_k, context).sample, abar[t_k])
        t = torch.randint(config.t_min, config.t_max + 1, (b,), generator=g)
        noisy = turbo.add_noise(x0.detach(), torch.randn(x0.shape, generator=g), abar[t])
        real = turbo.guided_x0(teacher, noisy, t, context, unc, abar, config.guidance)
        with torch.no_grad():
            fake_x0 = turbo.x0_from_v(noisy, fake(noisy, t, context).sample, abar[t])
        loss_g = turbo.dmd_loss(x0, turbo.dmd_gradient(x0.detach(), real, fake_x0))
        opt_gen.zero_grad(set_to_none=True)
        loss_g.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt_gen.step()
        out["loss_gen"] = loss_g.item()
        x0 = x0.detach()
    else:
        with torch.no_grad():
            x0 = turbo.x0_from_v(x_t, student(x_t, t_k, context).sample, abar[t_k])
    # 4. the critic learns the student's current distribution (denoising loss on its samples)
    t = torch.randint(0, len(abar), (b,), generator=g)
    n = torch.randn(x0.shape, generator=g)
    loss_f = F.mse_loss(fake(turbo.add_noise(x0, n, abar[t]), t, context).sample, turbo.v_target(x0, n, abar[t]))
    opt_fake.zero_grad(set_to_none=True)
    loss_f.backward()
    torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
    opt_fake.step()
    out["loss_fake"] = loss_f.item()
    return out


def student_shape(unet) -> tuple[int, int, int]:
    """(C, H, W) of the UNet's latents."""
    size = unet.config.sample_size
    return (unet.config.in_channels, size, size)


def _state_tensors(student, fake, opt_gen, opt_fake) -> tuple[dict, dict]:
    g_t, g_groups = flatten_optimizer(opt_gen)
    f_t, f_groups = flatten_optimizer(opt_fake)
    tensors = {**prefixed("student", student.state_dict()), **prefixed("fake", fake.state_dict()),
               **prefixed("g", g_t), **prefixed("f", f_t)}
    return tensors, {"gen": g_groups, "fake": f_groups}


def train_turbo(config: TurboTrainConfig, teacher_dir: Path, workdir: Path, output: Path | None,
                log: Callable[[str], None] = print, *, stage_dir: str = "turbo", probe: Callable | None = None,
                init_from: str | None = None):
    """Train (or resume) the student, checkpointing to `workdir/stage_dir` and exporting to `output`.

    Args:
        config: stage settings.
        teacher_dir: the teacher's pipeline folder (the shipped `weights/`).
        workdir: the training folder (`toy-train`).
        output: the `toy-turbo` folder to export at each checkpoint (None: no export).
        probe: called with the student after each checkpoint; returns a line to log (a quick measurement).
        init_from: a checkpoint folder under `workdir` whose newest student and critic start this run when
            `stage_dir` has no checkpoint yet (a warm start, e.g. at a lower learning rate; fresh optimisers).
    Returns:
        The student UNet.
    """
    torch.manual_seed(config.seed)
    ckdir = Path(workdir) / stage_dir
    ckdir.mkdir(parents=True, exist_ok=True)
    # 1. the frozen teacher, the "" context for its guidance, the schedule
    tok, text, teacher = load_teacher(teacher_dir)
    with torch.no_grad():
        uncond = text(tokenize(tok, [""]))[0]
    abar = _abar()
    # 2. student and critic start as copies of the teacher; resume
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    opt_gen = torch.optim.AdamW(student.parameters(), lr=config.lr_gen, weight_decay=config.weight_decay)
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=config.lr_fake, weight_decay=config.weight_decay)
    step, elapsed0, warm_from = 0, 0.0, None
    ck = load_latest(ckdir)
    if ck is not None:
        saved = ck.state.get("config", {})
        changed = {k: (saved[k], v) for k, v in asdict(config).items() if k not in ("steps", "checkpoint_every_s") and k in saved
                   and saved[k] != (list(v) if isinstance(v, tuple) else v)}
        if changed:
            raise ValueError(f"{ckdir} was trained with other settings {changed}; resume with them or start another folder")
        student.load_state_dict(unprefixed("student", ck.tensors))
        fake.load_state_dict(unprefixed("fake", ck.tensors))
        restore_optimizer(opt_gen, unprefixed("g", ck.tensors), ck.state["param_groups"]["gen"])
        restore_optimizer(opt_fake, unprefixed("f", ck.tensors), ck.state["param_groups"]["fake"])
        step, elapsed0 = ck.state["step"], ck.state.get("elapsed_s", 0.0)
        log(f"turbo: resumed at step {step}")
        warm_from = ck.state.get("warm_start")
    elif init_from is not None:
        warm = load_latest(Path(workdir) / init_from)
        if warm is None:
            raise FileNotFoundError(f"no checkpoint to warm-start from in {Path(workdir) / init_from}")
        student.load_state_dict(unprefixed("student", warm.tensors))
        fake.load_state_dict(unprefixed("fake", warm.tensors))
        warm_from = {"from": init_from, "step": warm.state["step"], "elapsed_s": warm.state.get("elapsed_s", 0.0)}
        log(f"turbo: warm start from {init_from} step {warm.state['step']} (fresh optimisers)")
    log(f"turbo: student {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters, batch {config.batch}")
    # 3. train
    last_save, t0, done0 = time.time(), time.time(), step
    gen_losses, fake_losses = [], []
    while step < config.steps:
        out = train_step(config, step, student, fake, teacher, text, tok, uncond, opt_gen, opt_fake, abar)
        step += 1
        fake_losses.append(out["loss_fake"])
        if "loss_gen" in out:
            gen_losses.append(out["loss_gen"])
        if step % 50 == 0:
            rate = (step - done0) / (time.time() - t0)
            log(f"turbo step {step} critic loss {np.mean(fake_losses[-50:]):.4f} "
                f"dmd loss {np.mean(gen_losses[-25:]) if gen_losses else float('nan'):.5f} {rate:.2f} steps/s")
        if time.time() - last_save > config.checkpoint_every_s or step == config.steps:
            tensors, groups = _state_tensors(student, fake, opt_gen, opt_fake)
            elapsed = elapsed0 + time.time() - t0
            save_checkpoint(ckdir, step, tensors, {"param_groups": groups, "config": asdict(config), "elapsed_s": elapsed,
                                                   "teacher": str(teacher_dir), "warm_start": warm_from}, keep=1)
            if output is not None:
                teacher_info = Path(teacher_dir) / "training.json"
                turbo.export_turbo(student, teacher_dir, output, provenance={
                    "stage": stage_dir, "step": step, "method": "DMD2 (distribution matching, no regression loss)",
                    "elapsed_s": round(elapsed, 1), "warm_start": warm_from, "teacher": json.loads(teacher_info.read_text()) if teacher_info.exists() else None,
                    "config": asdict(config)})
            log(f"turbo: checkpoint{' and export' if output is not None else ''} at step {step} ({elapsed / 60:.1f} min in all)")
            if probe is not None:
                log(f"turbo probe at step {step}: {probe(student)}")
            last_save = time.time()
    return student
