"""The toy's three-row factor table of a slider set: sliders, random rank-1 directions, prompt edits.

The same seeds are drawn for every row at -s and +s: (1) each slider alone, (2) random rank-1
directions with the sliders' factor norms (the control), (3) the prompt edits of `toy.edits` (the
model's ceiling). Each row is read twice: per seed (`factors.table`, how often a factor's reading
changes on a seed) and per distribution (`factors.distribution_table`, how far a factor's value
distribution moves, net of the noise floor measured on 2n base seeds). Used by `conceptkit
evaluate sliders` on the toy model and by `bench/sliders.py factors`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from conceptkit.diffusion import sample
from conceptkit.evaluate.common import to_uint8
from conceptkit.evaluate.slider_draws import signed_images
from conceptkit.toy import factors
from conceptkit.toy.edits import edit_images, edit_labels

ROWS = ("sliders", "random", "prompt_edits")
ROW_TITLES = {"sliders": "sliders", "random": "random rank-1, same norms", "prompt_edits": "prompt edits (ceiling)"}


@dataclass(frozen=True)
class FactorImages:
    """uint8 images behind the table: (S, n, 32, 32, 3) per row and end, (2n, 32, 32, 3) base."""

    slider_minus: np.ndarray
    slider_plus: np.ndarray
    random_minus: np.ndarray
    random_plus: np.ndarray
    edit_minus: np.ndarray
    edit_plus: np.ndarray
    base: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The images by the names `conceptkit evaluate sliders` saves them under."""
        return {f"factor_{name}_images": getattr(self, name) for name in self.__dataclass_fields__}


def draw(model, sset, indices: Sequence[int], seeds: Sequence[int], strength: float, base_seeds: Sequence[int], *,
         batch_size: int = 32, progress: Callable[[int], None] | None = None,
         sliders: tuple[torch.Tensor, torch.Tensor] | None = None) -> FactorImages:
    """Draw every row's images (see the module doc); `sliders` passes the sliders' (S, n, 3, H, W) images when drawn already."""

    if len(base_seeds) < 2 * len(seeds):
        raise ValueError(f"the noise floor of {len(seeds)} seeds needs {2 * len(seeds)} base seeds (got {len(base_seeds)})")

    def u8(x: torch.Tensor) -> np.ndarray:
        return np.stack([to_uint8(part) for part in x]) if len(x) else np.zeros((0, len(seeds), 32, 32, 3), np.uint8)

    if sliders is None:
        sliders = signed_images(model, sset, indices, seeds, strength, batch_size=batch_size, progress=progress)
    rnd = signed_images(model, sset, indices, seeds, strength, random_directions=True, batch_size=batch_size, progress=progress)
    edits = edit_images(model, sset, seeds, batch_size=batch_size, progress=progress)
    steps, guidance = int(sset.manifest["steps"]), float(sset.manifest["guidance"])
    base = []
    for i in range(0, len(base_seeds), batch_size):
        chunk = list(base_seeds[i:i + batch_size])
        base.append(sample(model, sset.prompt, chunk, steps, guidance))
        if progress:
            progress(len(chunk))
    return FactorImages(u8(sliders[0]), u8(sliders[1]), u8(rnd[0]), u8(rnd[1]), u8(edits[0]), u8(edits[1]),
                        to_uint8(torch.cat(base)))


def summary(per_seed: dict[str, Any], dist: dict[str, Any]) -> dict[str, Any]:
    """One line of the table: each purity beside the effect size it comes with."""
    rows = per_seed["per_slider"]
    return {
        "per_seed_purity": per_seed["mean_purity"],
        "per_seed_change": float(np.mean([sum(r["change"].values()) for r in rows])) if rows else 0.0,
        "per_seed_coverage": per_seed["n_covered"],
        "distribution_purity": dist["mean_distribution_purity"], "n_above_floor": dist["n_above_floor"],
        "main_effect": dist["mean_main_effect"], "n_strong": dist["n_strong"], "consistency": dist["mean_toward"],
        "coverage": dist["n_covered"], "covered": dist["coverage"], "labels_right": dist["labels_right"],
        "per_seed_labels_right": per_seed["labels_right"], "valid": per_seed["valid"], "count": len(rows),
    }


def table(images: FactorImages, indices: Sequence[int], labels: Sequence[str], *, seed: int = 0) -> dict[str, Any]:
    """The three rows, each read per seed and per distribution, from the images alone."""

    ends = {"sliders": (images.slider_minus, images.slider_plus, list(indices), list(labels)),
            "random": (images.random_minus, images.random_plus, list(indices), list(labels)),
            "prompt_edits": (images.edit_minus, images.edit_plus, list(range(len(images.edit_minus))), edit_labels())}
    out: dict[str, Any] = {"seeds": int(images.slider_minus.shape[1]), "base_seeds": int(len(images.base)), "rows": {}}
    for name in ROWS:
        lo, hi, idx, lab = ends[name]
        per_seed = factors.table(list(lo), list(hi), idx, lab)
        dist = factors.distribution_table(list(lo), list(hi), images.base, idx, lab, seed=seed)
        out["rows"][name] = {"summary": summary(per_seed, dist), "per_seed": per_seed, "distribution": dist}
    out["floor"] = out["rows"]["sliders"]["distribution"]["floor"]
    return out
