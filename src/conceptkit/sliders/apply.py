"""The slider modification for sampling: sliders of one or more sets on a UNet, from their start step on.

SliderSpace (Gandikota et al. 2025, Sec. 4) applies a slider from a fraction of the denoising steps on
(the set's `start`); before that step the UNet is the base model's, bitwise. Sliders add up
(`SliderBank.set_dense_routing`), with one weight vector for every image or one per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from conceptkit.diffusion import window_steps
from conceptkit.sliders.bank import SliderLoraConfig, install_sliders
from conceptkit.sliders.pipeline import SliderInfo, SliderSet
from conceptkit.sliders.sets import slider_path


class SliderModification:
    """Sliders of one or more sets on a UNet: weights (K,) for every image or (N, K) per image."""

    def __init__(self, unet, chosen: Sequence[tuple[SliderSet, SliderInfo]], cfg_batches: bool):
        self.sets: dict[str, SliderSet] = {}
        self.slots: dict[tuple[str, int], tuple[str, int]] = {}  # (set, index) -> (set, slot)
        for sset, info in chosen:
            self.sets.setdefault(sset.name, sset)
        self.banks = {}
        for name, sset in self.sets.items():
            used = sorted({info.index for s, info in chosen if s.name == name})
            st = sset.manifest["settings"]
            bank = install_sliders(unet, SliderLoraConfig(len(used), rank=int(st["rank"]), alpha=float(st["alpha"]),
                                                          target_modules=st["targets"]))
            for slot, index in enumerate(used):
                bank.load_slider(slot, slider_path(sset, sset.sliders[index]))
                self.slots[(name, index)] = (name, slot)
            self.banks[name] = bank
        self.cfg_batches = cfg_batches
        self.weights: dict[str, torch.Tensor] = {}
        self.active = False

    def set_weights(self, scales: dict[tuple[str, int], float] | list[dict[tuple[str, int], float]]) -> None:
        """One {(set, index): scale} for every image, or a list of them, one per image."""
        per_image = scales if isinstance(scales, list) else [scales]
        for name, bank in self.banks.items():
            w = torch.zeros(len(per_image), bank.num_sliders, dtype=torch.float64)
            for n, sc in enumerate(per_image):
                for (set_name, index), value in sc.items():
                    if set_name == name:
                        w[n, self.slots[(set_name, index)][1]] += value
            if not isinstance(scales, list):
                w = w[0]
            elif self.cfg_batches:
                w = w.repeat(2, 1)  # the UNet batch is [uncond; cond]
            self.weights[name] = w
        self._apply()

    def set_step(self, i: int, n: int) -> None:
        starts = {name: first_step(sset, n) for name, sset in self.sets.items()}
        for name, bank in self.banks.items():
            on = i >= starts[name]
            bank.set_dense_routing(self.weights.get(name) if on else None)

    def _apply(self) -> None:
        """New weights take effect at the next `set_step`; until then the UNet is the base model."""
        for bank in self.banks.values():
            bank.set_dense_routing(None)

    def remove(self) -> None:
        for bank in self.banks.values():
            bank.remove()

    def describe(self) -> dict[str, Any]:
        return {"kind": "sliders", "sets": {n: {"path": str(s.path), "prompt": s.prompt, "start": s.manifest.get("start", 0.0)}
                                            for n, s in self.sets.items()}}


def first_step(sset: SliderSet, n: int) -> int:
    """Index of the first of n denoising steps the set's sliders act on."""
    return window_steps(n, float(sset.manifest.get("start", 0.0)))


def random_combinations(n: int, k: int, per_image: int, scale: float, seed: int) -> np.ndarray:
    """(n, k) strengths: each row has `per_image` distinct non-zero entries uniform in [-scale, scale]."""
    rng = np.random.default_rng(seed)
    w = np.zeros((n, k))
    for row in w:
        for j in rng.choice(k, size=min(per_image, k), replace=False):
            row[j] = rng.uniform(-scale, scale)
    return w
