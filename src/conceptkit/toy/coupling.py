"""Noise-coupled training: the starting noise decides every factor the caption leaves open.

A toy UNet trained on independent (noise, image) pairs decides the unnamed factors of "a shape"
chaotically: naming one factor ("a red shape") with the same seed re-draws the others as well
(measured on the shipped toy: prompt edits from the slider window change the other factors in
20-90% of seeds). Real models keep a seed's layout across prompt edits because a denoiser
amplifies the faint structure the noise already has. The toy gets that property by construction.

For each factor, the latents of the training pool give one mean per value. Centred, they span a
(V - 1)-dimensional subspace of the (4, 8, 8) latent; the subspaces are made mutually orthogonal
(in `ORDER`) and each factor's V value directions are replaced by the nearest regular simplex
(orthogonal Procrustes). A noise "says" value v of a factor when its projection on that factor's
subspace is closest in angle to vertex v. During training, for each factor the caption does not
name, the noise's projection on the factor's subspace is redrawn from the standard normal
conditioned on saying the scene's value (rejection sampling in V - 1 dimensions); everything else
stays as drawn. The projection of N(0, I) on orthogonal subspaces is independent standard normal,
and the simplex's symmetry makes every value equally likely, so the noise stays N(0, I): sampling
starts from plain Gaussian noise, and the faint structure it carries points the way the latent of
that value does, which the denoiser already follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from conceptkit.toy.world import FACTORS, Scene

ORDER = ("horizontal", "vertical", "size", "background", "colour", "shape")  # orthogonalisation order
FILE = "coupling.safetensors"  # in the weights folder of a coupled toy


@dataclass(frozen=True)
class Coupling:
    """Per factor, an orthonormal basis of its subspace and the value vertices in that basis."""

    basis: dict[str, torch.Tensor]  # factor -> (V - 1, D) orthonormal rows
    vertices: dict[str, torch.Tensor]  # factor -> (V, V - 1) unit rows, a regular simplex

    def read(self, noise: torch.Tensor) -> list[dict[str, str]]:
        """The value of every factor that each noise (N, ...) says."""
        flat = noise.reshape(len(noise), -1).double()
        idx = {f: ((flat @ self.basis[f].double().T) @ self.vertices[f].double().T).argmax(1) for f in ORDER}
        return [{f: FACTORS[f][int(idx[f][n])] for f in FACTORS} for n in range(len(noise))]

    def couple(self, noise: torch.Tensor, scenes: Sequence[Scene], named: Sequence[set[str]], generator: torch.Generator) -> torch.Tensor:
        """Noise (N, ...) redrawn on each factor subspace a row's caption leaves open, so that it says the scene's value."""
        flat = noise.reshape(len(noise), -1).double().clone()
        for f in ORDER:
            rows = [n for n, nm in enumerate(named) if f not in nm]
            if not rows:
                continue
            b, v = self.basis[f].double(), self.vertices[f].double()
            want = torch.tensor([FACTORS[f].index(getattr(scenes[n], f)) for n in rows])
            new = torch.empty(len(rows), b.shape[0], dtype=torch.float64)
            todo = torch.arange(len(rows))
            while len(todo):  # rejection sampling: each draw says the wanted value with probability 1/V
                draw = torch.randn(len(todo), b.shape[0], generator=generator, dtype=torch.float64)
                hit = (draw @ v.T).argmax(1) == want[todo]
                new[todo[hit]] = draw[hit]
                todo = todo[~hit]
            r = torch.tensor(rows)
            flat[r] += (new - flat[r] @ b.T) @ b
        return flat.reshape(noise.shape).to(noise.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"basis.{f}": t.contiguous() for f, t in self.basis.items()},
                **{f"vertices.{f}": t.contiguous() for f, t in self.vertices.items()}}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file(self.tensors(), str(tmp), {"format": "conceptkit-toy-coupling-1"})
        tmp.replace(path)


def load_coupling(path: Path) -> Coupling:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return Coupling({f: t[f"basis.{f}"] for f in ORDER}, {f: t[f"vertices.{f}"] for f in ORDER})


def regular_simplex(v: int) -> torch.Tensor:
    """(v, v - 1) unit rows with pairwise cosine -1 / (v - 1)."""
    centred = torch.eye(v, dtype=torch.float64) - 1.0 / v
    u, _, _ = torch.linalg.svd(centred)
    coords = centred @ u[:, : v - 1]
    return coords / coords.norm(dim=1, keepdim=True)


def from_latents(latents: torch.Tensor, scenes: Sequence[Scene]) -> Coupling:
    """Build the coupling from a pool of latents (N, ...) and their scenes (see the module doc)."""
    flat = latents.reshape(len(latents), -1).double()
    flat = flat - flat.mean(0)
    taken = torch.zeros(0, flat.shape[1], dtype=torch.float64)
    basis, vertices = {}, {}
    for f in ORDER:
        values = FACTORS[f]
        idx = torch.tensor([values.index(getattr(s, f)) for s in scenes])
        missing = [values[k] for k in range(len(values)) if not (idx == k).any()]
        if missing:
            raise ValueError(f"the pool has no scene with {f} {missing}: draw a larger pool")
        means = torch.stack([flat[idx == k].mean(0) for k in range(len(values))])
        means = means - means.mean(0)
        means = means - (means @ taken.T) @ taken  # orthogonal to the factors before
        u, _, vh = torch.linalg.svd(means, full_matrices=False)
        b = vh[: len(values) - 1]  # (V - 1, D) basis of the span
        coords = means @ b.T
        coords = coords / coords.norm(dim=1, keepdim=True)
        s0 = regular_simplex(len(values))
        uu, _, vv = torch.linalg.svd(s0.T @ coords)  # Procrustes: the rotation taking s0 closest to coords
        basis[f], vertices[f] = b.float(), (s0 @ (uu @ vv)).float()
        taken = torch.cat([taken, b])
    return Coupling(basis, vertices)
