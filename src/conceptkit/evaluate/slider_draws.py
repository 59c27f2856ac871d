"""Images drawn with sliders on fixed seeds: per-image strength rows, and each slider alone at -s and +s.

What `conceptkit evaluate sliders` and the toy's factor table (`evaluate.toy_factors`) draw;
the strengths of random sparse combinations come from `sliders.apply.random_combinations`,
the same draw `generate --random-sliders` makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from conceptkit.diffusion import sample
from conceptkit.sliders.apply import SliderModification


def draw(model, mod, prompt: str, seeds: Sequence[int], weights: np.ndarray | None, steps: int, guidance: float,
         batch_size: int, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Images (n, 3, H, W) for `seeds`, row i with slider strengths weights[i] (None: the base model).

    Columns of `weights` follow `mod.slots` (the (set, index) keys in slot order).
    """
    out = []
    for i in range(0, len(seeds), batch_size):
        chunk = list(seeds[i:i + batch_size])
        if weights is None:
            out.append(sample(model, prompt, chunk, steps, guidance))
        else:
            slots = list(mod.slots)  # (set, index) in slot order
            mod.set_weights([{slot: float(w[j]) for j, slot in enumerate(slots) if w[j] != 0}
                             for w in weights[i:i + len(chunk)]])
            out.append(sample(model, prompt, chunk, steps, guidance, [mod]))
        if progress:
            progress(len(chunk))
    return torch.cat(out)


def randomise(mod, set_name: str, seed: int = 1) -> None:
    """Replace a set's slider factors, in place, by random rank-1 factors of the same norms (the control)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.banks[set_name].parameters():
            norms = torch.linalg.vector_norm(p, dim=tuple(range(1, p.ndim)), keepdim=True)  # one norm per slider, conv factors too
            p.copy_(torch.randn(p.shape, generator=gen) * norms / p[0].numel() ** 0.5)


def signed_images(model, sset, indices: Sequence[int], seeds: Sequence[int], strength: float, *, random_directions: bool = False,
                  batch_size: int = 32, progress: Callable[[int], None] | None = None, mod=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each listed slider alone at -strength and +strength on `seeds`: two (S, n, 3, H, W) tensors.

    `random_directions` replaces the sliders' factors by random rank-1 factors of the same norms
    (the control of `bench/sliders.py factors`).
    """
    steps, guidance = int(sset.manifest["steps"]), float(sset.manifest["guidance"])
    own = mod is None
    if own:
        mod = SliderModification(model.pipe.unet, [(sset, sset.sliders[i]) for i in indices], cfg_batches=guidance > 1.0)
    try:
        if random_directions:
            randomise(mod, sset.name)
        keys = list(mod.slots)
        slot_of = {idx: keys.index((sset.name, idx)) for idx in indices}
        k = len(keys)
        jobs_seeds, rows = [], []
        for sign in (-1.0, 1.0):
            for i in indices:
                for s in seeds:
                    w = np.zeros(k)
                    w[slot_of[i]] = sign * strength
                    jobs_seeds.append(s)
                    rows.append(w)
        images = draw(model, mod, sset.prompt, jobs_seeds, np.stack(rows), steps, guidance, batch_size, progress)
    finally:
        if own:
            mod.remove()
    images = images.view(2, len(indices), len(seeds), *images.shape[1:])
    return images[0], images[1]
