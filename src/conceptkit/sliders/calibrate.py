"""Strength calibration: what strength 1 does, set by measurement instead of by the learning rate.

SliderSpace's loss (the cosine of a slider's shift with its direction) fixes where a slider
points, not how far it moves the image: on the toy, 100 steps at lr 5e-3 leave the sliders so weak
that +-2 moves their factor's distribution by a tenth of what naming the factor does, and the size
follows the learning rate roughly as its square (docs/sliders.md). So after training, every slider
of the set is scaled by one factor c (folded into lora_B, so exported files carry it) chosen so that
at strength 1 the images move along their directions by `TARGET` standard deviations of the
harvested images along each direction, each way, on average over the set's sliders.

The response is measured as the user sees it: each slider alone at -s and +s on `seeds` held-out
seeds (`SEED_BASE` on: apart from the seeds `generate` and `evaluate` start at), sampled with the
harvest's steps and guidance and the slider window, embedded with the set's encoder. It is
sublinear in s, so c is found in two steps (a proportional guess, then a secant in log-log), and
the response at c is measured once more and recorded. One factor for the whole set keeps the
sliders' relative sizes as training made them; it never rescales one slider against another.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from conceptkit.diffusion import sample, window_steps
from conceptkit.models.flow import cfg_batches

TARGET = 0.27  # mean shift per side at strength 1, in standard deviations of the harvested images along each direction (docs/sliders.md: chosen on the toy)
SEED_BASE = 900_000  # calibration seeds: SEED_BASE, SEED_BASE + 1, ...
MAX_SCALE = 16.0  # c is kept within [1 / MAX_SCALE, MAX_SCALE]


@dataclass(frozen=True)
class Calibration:
    """The factor folded into the set's sliders and what it was measured from."""

    scale: float  # c: strength s now acts as s * c did after training
    target: float  # TARGET
    seeds: int
    sigma: np.ndarray  # (K,) std of the harvested final images' embeddings along each direction
    before: np.ndarray  # (K,) response at strength 1 before calibration (shift per side / sigma)
    after: np.ndarray  # (K,) the same at the calibrated scale
    note: str = ""  # why c stayed 1, when it did

    def to_json(self) -> dict:
        return {"scale": self.scale, "target": self.target, "seeds": self.seeds, "seed_base": SEED_BASE,
                "sigma": [float(v) for v in self.sigma], "before": [float(v) for v in self.before],
                "after": [float(v) for v in self.after], "mean_before": float(self.before.mean()),
                "mean_after": float(self.after.mean()), "note": self.note}


def spread(embeddings: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """(K,) standard deviation of (M, d) embeddings projected on each of the (K, d) unit directions."""
    x = np.asarray(embeddings, np.float64)
    return ((x - x.mean(0)) @ np.asarray(directions, np.float64).T).std(0)


def next_scale(c0: float, r0: float, c1: float | None = None, r1: float | None = None, target: float = TARGET) -> float:
    """The next factor: proportional from one measurement, a secant in log-log from two (exponent in [0.3, 1.5])."""
    if c1 is None or r1 is None:
        c, power, r = c0, 1.0, r0
    else:
        power = 1.0
        if r0 > 0 and r1 > 0 and abs(math.log(c1 / c0)) > 1e-6:
            power = min(max(math.log(r1 / r0) / math.log(c1 / c0), 0.3), 1.5)
        c, r = c1, r1
    if not r > 0:
        return min(c * 4.0, MAX_SCALE)  # no movement along the directions: step up, within the bound
    return float(min(max(c * (target / r) ** (1.0 / power), 1.0 / MAX_SCALE), MAX_SCALE))


class _Window:
    """Per-image slider strengths on a trained bank, from the slider window's first step on (a `diffusion.sample` modification)."""

    def __init__(self, bank, start: float, cfg_batches: bool):
        self.bank, self.start, self.cfg_batches = bank, start, cfg_batches
        self.weights: torch.Tensor | None = None

    def set(self, weights: torch.Tensor) -> None:
        self.weights = weights.repeat(2, 1) if self.cfg_batches else weights

    def set_step(self, i: int, n: int) -> None:
        self.bank.set_dense_routing(self.weights if i >= window_steps(n, self.start) else None)


def response(model, bank, encoder, prompt: str, directions: np.ndarray, sigma: np.ndarray, *, scale: float, seeds: int,
             steps: int, guidance: float, start: float, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(K,) mean shift per side along each slider's direction at strength +-`scale`, over `seeds` seeds, in units of sigma."""
    k = bank.num_sliders
    window = _Window(bank, start, cfg_batches(model, guidance))
    seed_list = [SEED_BASE + i for i in range(seeds)]
    v = torch.as_tensor(np.asarray(directions), dtype=torch.float32)
    out = np.zeros(k)
    try:
        for slider in range(k):
            ends = []
            for sign in (-1.0, 1.0):
                w = torch.zeros(seeds, k, dtype=torch.float64)
                w[:, slider] = sign * scale
                window.set(w)
                ends.append(encoder.embed(sample(model, prompt, seed_list, steps, guidance, [window])))
                if progress:
                    progress(seeds)
            out[slider] = float((ends[1] - ends[0]).mean(0).double() @ v[slider].double()) / 2
    finally:
        bank.set_dense_routing(None)
    return out / np.maximum(np.asarray(sigma, np.float64), 1e-12)


def calibrate(model, bank, encoder, prompt: str, directions: np.ndarray, final_embeddings: np.ndarray, *, seeds: int,
              steps: int, guidance: float, start: float, progress: Callable[[int], None] | None = None) -> Calibration:
    """Find c (see the module doc), fold it into the bank's lora_B and return what was measured."""
    sigma = spread(final_embeddings, directions)

    def measure(c: float) -> np.ndarray:
        return response(model, bank, encoder, prompt, directions, sigma, scale=c, seeds=seeds, steps=steps,
                        guidance=guidance, start=start, progress=progress)

    before = measure(1.0)
    r0 = float(before.mean())
    c1 = next_scale(1.0, r0)
    r1 = float(measure(c1).mean())
    c = next_scale(1.0, r0, c1, r1)
    after = measure(c)
    note = ""
    if not float(after.mean()) > 0:
        c, after, note = 1.0, before, "the sliders do not move the images along their directions: left at scale 1"
    with torch.no_grad():
        for b in bank.lora_B:
            b.mul_(c)
    return Calibration(float(c), TARGET, seeds, sigma, before, after, note)


def batches_to_sample(count: int) -> int:
    """Sampling batches (of `seeds` images each) calibration runs: three measurements of every slider at -s and +s."""
    return 3 * 2 * count
