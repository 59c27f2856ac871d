"""Noise coupling of the toy UNet's training (`conceptkit.toy.coupling`)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from conceptkit.toy import coupling
from conceptkit.toy.world import FACTORS, sample_scenes

DIM = 4 * 8 * 8


@pytest.fixture(scope="module")
def built():
    """A coupling built from synthetic latents: each factor value adds its own random signature."""
    scenes = sample_scenes(3000, seed=4)
    g = torch.Generator().manual_seed(0)
    sig = {f: torch.randn(len(v), DIM, generator=g) for f, v in FACTORS.items()}
    lat = torch.randn(len(scenes), DIM, generator=g) * 0.5
    for f, v in FACTORS.items():
        lat += sig[f][torch.tensor([v.index(getattr(s, f)) for s in scenes])]
    return coupling.from_latents(lat.view(-1, 4, 8, 8), scenes), sig


def test_subspaces_are_orthonormal_and_values_form_regular_simplices(built):
    cpl, sig = built
    basis = torch.cat([cpl.basis[f] for f in coupling.ORDER])
    assert basis.shape == (sum(len(FACTORS[f]) - 1 for f in coupling.ORDER), DIM)
    torch.testing.assert_close(basis @ basis.T, torch.eye(len(basis)), atol=1e-5, rtol=0)
    for f in coupling.ORDER:
        v = cpl.vertices[f]
        n = len(FACTORS[f])
        want = torch.full((n, n), -1 / (n - 1)) + torch.eye(n) * (1 + 1 / (n - 1))
        torch.testing.assert_close(v @ v.T, want, atol=1e-5, rtol=0)
    # the first factor's vertices point the way its values' latent signatures do
    f = coupling.ORDER[0]
    centred = sig[f] - sig[f].mean(0)
    cos = torch.nn.functional.cosine_similarity(cpl.vertices[f] @ cpl.basis[f], centred, dim=1)
    assert (cos > 0.8).all(), cos


def test_plain_noise_says_every_value_equally_often(built):
    cpl, _ = built
    reads = cpl.read(torch.randn(6000, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
    for f, values in FACTORS.items():
        counts = Counter(r[f] for r in reads)
        share = np.array([counts[v] for v in values]) / len(reads)
        assert np.abs(share - 1 / len(values)).max() < 0.03, (f, share)


def test_coupled_noise_says_the_unnamed_factors_and_only_those(built):
    cpl, _ = built
    scenes = sample_scenes(800, seed=5)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(800, 4, 8, 8, generator=g)
    assert all(r == s.factors for r, s in zip(cpl.read(cpl.couple(noise, scenes, [set()] * 800, g)), scenes))
    named = cpl.read(cpl.couple(noise, scenes, [{"colour", "shape"}] * 800, g))
    for f in ("size", "horizontal", "vertical", "background"):
        assert all(r[f] == getattr(s, f) for r, s in zip(named, scenes))
    # named factors are left to the caption: the noise says them only by chance
    assert np.mean([r["colour"] == s.colour for r, s in zip(named, scenes)]) < 0.25
    assert np.mean([r["shape"] == s.shape for r, s in zip(named, scenes)]) < 0.4


def test_coupling_keeps_the_noise_standard_normal_and_touches_only_the_subspaces(built, tmp_path):
    cpl, _ = built
    scenes = sample_scenes(4000, seed=2)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(4000, 4, 8, 8, generator=g)
    out = cpl.couple(noise, scenes, [set()] * 4000, g).reshape(4000, -1)
    basis = torch.cat([cpl.basis[f] for f in coupling.ORDER])
    proj = out @ basis.T
    assert abs(float(out.mean())) < 0.01 and abs(float(out.std()) - 1) < 0.01
    assert (proj.std(0) - 1).abs().max() < 0.06 and proj.mean(0).abs().max() < 0.06
    rest = lambda x: x - (x @ basis.T) @ basis  # noqa: E731
    torch.testing.assert_close(rest(out), rest(noise.reshape(4000, -1)), atol=1e-4, rtol=0)
    # and it round-trips through safetensors
    cpl.save(tmp_path / coupling.FILE)
    again = coupling.load_coupling(tmp_path / coupling.FILE)
    assert again.read(noise[:50]) == cpl.read(noise[:50])
