"""Stage 1: train the toy CLIP contrastively on the world's images and partial captions.

A caption that leaves factors unsaid matches many images in a batch, so the targets are soft:
caption i is a positive for image j whenever every factor it names agrees with image j
(a multi-positive variant of the CLIP loss of Radford et al. (2021), Fig. 3).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from conceptkit.toy.checkpoint import flatten_optimizer, load_latest, prefixed, restore_optimizer, save_checkpoint, unprefixed
from conceptkit.toy.data import captions_for, draw_mentions, make_pool, step_generator, step_rng, to_model_range
from conceptkit.toy.model import CONTEXT_LENGTH, ToyArchitecture, build_clip, build_tokenizer, image_embeds, text_embeds
from conceptkit.toy.world import FACTORS, SIZE_RANGES, Scene, factor_indices, prompt, render


@dataclass(frozen=True)
class ClipTrainConfig:
    """Settings of the CLIP stage."""

    steps: int = 1600  # optimiser steps
    batch: int = 256  # image-caption pairs per step
    lr: float = 1e-3  # AdamW peak learning rate
    warmup: int = 200  # linear warm-up steps, then cosine decay to 0
    weight_decay: float = 0.05
    pool: int = 60_000  # fixed training images
    p_mention: float = 0.6  # probability a caption names a factor
    noise: float = 0.04  # std of pixel noise added to half the images (robustness to generated images)
    seed: int = 0
    checkpoint_every_s: float = 120.0  # wall seconds between checkpoints
    freeze_text: bool = False  # train only the vision tower, projections and temperature (text tower fixed)
    contrast: float = 0.0  # share of each batch made of contrast groups (see `contrast_groups`)
    contrast_factors: tuple[str, ...] = ("shape", "size")

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch < 2 or self.pool < self.batch:
            raise ValueError("need steps > 0, batch >= 2 and pool >= batch")
        if not 0 < self.p_mention <= 1:
            raise ValueError(f"p_mention must be in (0, 1], got {self.p_mention}")
        if not 0 <= self.contrast < 1:
            raise ValueError(f"contrast must be in [0, 1), got {self.contrast}")


def contrast_groups(scenes: list[Scene], rng: np.random.Generator, n: int, factors: tuple[str, ...],
                    p_mention: float) -> tuple[list[Scene], np.ndarray]:
    """`n` scenes in groups that differ in one factor only, and whose captions name it.

    Each group takes one base scene and redraws it once per value of a factor (shape: the same
    box; size: a new side in the value's range), so inside a group only that factor tells the
    images apart. Without such groups colour, which the pixels' mean gives away, explains most of
    a random batch and the towers learn shape and size late or not at all (measured: shape words
    left nearly collinear in the text tower, zero-shot shape 0.39).

    Returns: (scenes, mentions (len, F) bool).
    """
    names = list(FACTORS)
    out: list[Scene] = []
    rows: list[np.ndarray] = []
    g = 0
    while len(out) < n:
        base = scenes[int(rng.integers(len(scenes)))]
        f = factors[g % len(factors)]
        g += 1
        for value in FACTORS[f]:
            change = {f: value}
            if f == "size":
                lo, hi = SIZE_RANGES[value]
                change["side"] = lo + (hi - lo) * float(rng.random())
            out.append(dataclasses.replace(base, **change))
            row = rng.random(len(names)) < p_mention
            row[names.index(f)] = True
            rows.append(row)
    return out[:n], np.array(rows[:n])  # the last group may be cut short


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """(N, CONTEXT_LENGTH) input ids padded the way `StableDiffusionPipeline` pads them."""
    return tokenizer(texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt").input_ids


def contrastive_targets(factors: np.ndarray, mentions: np.ndarray) -> torch.Tensor:
    """(B, B) 0/1 matrix: caption i (naming factors `mentions[i]`) is true of image j.

    Args:
        factors: (B, F) value indices of the images.
        mentions: (B, F) bool, the factors each caption names (caption i describes image i).
    """
    agree = factors[:, None, :] == factors[None, :, :]  # (B, B, F)
    ok = np.all(agree | ~mentions[:, None, :], axis=2)
    return torch.from_numpy(ok.astype(np.float32))


def clip_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy with soft multi-positive targets.

    Args:
        logits: (B, B) caption-by-image similarities times the logit scale.
        targets: (B, B) 0/1 caption-by-image truth (diagonal all ones).
    """
    t2i = -(F.log_softmax(logits, dim=1) * targets / targets.sum(1, keepdim=True)).sum(1).mean()
    i2t = -(F.log_softmax(logits.T, dim=1) * targets.T / targets.T.sum(1, keepdim=True)).sum(1).mean()
    return (t2i + i2t) / 2


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, factors: np.ndarray) -> dict[str, float]:
    """Per-factor zero-shot accuracy: pick the value whose one-factor prompt scores highest.

    Args:
        images: (N, 3, 32, 32) in [-1, 1].
        factors: (N, F) true value indices.
    """
    model.eval()
    img = torch.cat([image_embeds(model, c) for c in images.split(512)])
    out = {}
    for j, (name, values) in enumerate(FACTORS.items()):
        ids = tokenize(tokenizer, [prompt(**{name: v}) for v in values])
        txt = text_embeds(model, ids)
        out[name] = float(((img @ txt.T).argmax(1).numpy() == factors[:, j]).mean())
    return out


def train_clip(config: ClipTrainConfig, arch: ToyArchitecture, workdir: Path, log: Callable[[str], None] = print, init=None):
    """Train (or resume) the toy CLIP; returns (model, tokenizer).

    Args:
        config: stage settings.
        arch: network sizes.
        workdir: checkpoint folder of this stage (`toy-train/clip`).
        init: optional (CLIPModel, CLIPTokenizer) to start from instead of a fresh model.
    """
    torch.manual_seed(config.seed)
    # 1. tokenizer, model, optimiser, fixed image pool
    if init is None:
        tok = build_tokenizer()
        model = build_clip(arch, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    else:
        model, tok = init
    if config.freeze_text:
        model.text_model.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / config.warmup) * 0.5 * (1 + np.cos(np.pi * min(s, config.steps) / config.steps)))
    pool = make_pool(config.pool, seed=config.seed + 1)
    step = 0
    # 2. resume
    ck = load_latest(workdir)
    if ck is not None:
        model.load_state_dict(unprefixed("model", ck.tensors))
        restore_optimizer(opt, ck.tensors, ck.state["param_groups"])
        step = ck.state["step"]
        sched.last_epoch = step - 1
        sched.step()
        log(f"clip: resumed at step {step}")
    # 3. train
    last_save, t0, done0 = time.time(), time.time(), step
    while step < config.steps:
        model.train()
        rng = step_rng(config.seed, step)
        n_contrast = int(config.batch * config.contrast)
        idx = rng.choice(config.pool, size=config.batch - n_contrast, replace=False)
        mentions = draw_mentions(rng, len(idx), config.p_mention)
        scenes = [pool.scenes[i] for i in idx]
        x = pool.images[idx]
        factors = pool.factors[idx]
        if n_contrast:
            extra, extra_mentions = contrast_groups(pool.scenes, rng, n_contrast, config.contrast_factors, config.p_mention)
            scenes, mentions = scenes + extra, np.concatenate([mentions, extra_mentions])
            x = torch.cat([x, to_model_range(render(extra))])
            factors = np.concatenate([factors, factor_indices(extra)])
        ids = tokenize(tok, captions_for(scenes, mentions))
        g = step_generator(config.seed, step)
        noisy = torch.rand(config.batch, 1, 1, 1, generator=g) < 0.5
        x = x + noisy * config.noise * torch.randn(x.shape, generator=g)
        out = model(input_ids=ids, pixel_values=x)
        loss = clip_loss(out.logits_per_text, contrastive_targets(factors, mentions))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 100 == 0:
            log(f"clip step {step} loss {loss.item():.4f} {(step - done0) / (time.time() - t0):.2f} steps/s")
        if time.time() - last_save > config.checkpoint_every_s or step == config.steps:
            tensors, groups = flatten_optimizer(opt)
            save_checkpoint(workdir, step, {**prefixed("model", model.state_dict()), **tensors},
                            {"param_groups": groups, "config": asdict(config), "elapsed_s": time.time() - t0})
            last_save = time.time()
    return model.eval(), tok
