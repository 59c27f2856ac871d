"""Fixed training pools of the toy world and per-step batches drawn from them reproducibly.

Every batch is a pure function of (seed, step), so a resumed run draws exactly the batches an
uninterrupted one would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from conceptkit.toy.world import FACTORS, Scene, caption, factor_indices, render, sample_scenes


@dataclass(frozen=True)
class Pool:
    """A fixed set of scenes with their images.

    Attributes:
        scenes: N scenes.
        images: (N, 3, 32, 32) float32 in [-1, 1] (the VAE's and the toy CLIP's input range).
        factors: (N, F) int64 value index of each factor.
    """

    scenes: list[Scene]
    images: torch.Tensor
    factors: np.ndarray


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, 3, 32, 32) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div(127.5).sub(1.0)


def signed_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, 32, 32) float in [-1, 1] -> (N, 32, 32, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_pool(n: int, seed: int, chunk: int = 4096) -> Pool:
    """Sample and render `n` scenes.

    Args:
        n: pool size.
        seed: scene seed.
    """
    scenes = sample_scenes(n, seed)
    images = torch.cat([to_model_range(render(scenes[i : i + chunk])) for i in range(0, n, chunk)])
    return Pool(scenes=scenes, images=images, factors=factor_indices(scenes))


def draw_mentions(rng: np.random.Generator, n: int, p_mention: float) -> np.ndarray:
    """(n, F) bool: which factors each caption names."""
    return rng.random((n, len(FACTORS))) < p_mention


def captions_for(scenes: list[Scene], mentions: np.ndarray) -> list[str]:
    """Captions naming, for each scene, the factors flagged in its row of `mentions`."""
    names = list(FACTORS)
    return [caption(sc, {names[j] for j in np.flatnonzero(row)}) for sc, row in zip(scenes, mentions)]


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The numpy generator of one training step."""
    return np.random.default_rng([seed, step])


def step_generator(seed: int, step: int) -> torch.Generator:
    """The torch generator of one training step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)
