"""Noise coupling of the toy UNet's training (`conceptkit.toy.coupling`)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from conceptkit.toy import coupling
from conceptkit.toy.world import FACTORS, sample_scenes


def test_patterns_are_orthonormal_and_survive_group_norm():
    p = coupling.patterns()
    assert p.shape == (len(coupling.SLOTS), 256)
    torch.testing.assert_close(p @ p.T, torch.eye(len(coupling.SLOTS)), atol=1e-5, rtol=0)
    # zero spatial mean in every channel (GroupNorm would remove a constant), and the horizontal
    # pattern rises from left to right in every channel
    assert p.view(-1, 4, 64).mean(-1).abs().max() < 1e-6
    ramp = p[1].view(4, 8, 8)
    assert (ramp[:, :, -1] > ramp[:, :, 0]).all() and torch.allclose(ramp[:, 0], ramp[:, -1])


def test_plain_noise_draws_every_value_equally_often():
    reads = coupling.read_noise(torch.randn(6000, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    for f, values in FACTORS.items():
        counts = Counter(r[f] for r in reads)
        assert set(counts) == set(values)
        share = np.array([counts[v] for v in values]) / len(reads)
        assert np.abs(share - 1 / len(values)).max() < 0.03, (f, share)


def test_coupled_noise_carries_the_unnamed_factors_and_only_those():
    scenes = sample_scenes(800, seed=5)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(800, 4, 8, 8, generator=g)
    open_ = coupling.read_noise(coupling.couple(noise, scenes, [set()] * 800, g))
    assert all(r == s.factors for r, s in zip(open_, scenes))
    named = coupling.read_noise(coupling.couple(noise, scenes, [{"colour", "shape"}] * 800, g))
    for f in ("size", "horizontal", "vertical", "background"):
        assert all(r[f] == getattr(s, f) for r, s in zip(named, scenes))
    # named factors are left to the caption: the noise agrees with them only by chance
    assert np.mean([r["colour"] == s.colour for r, s in zip(named, scenes)]) < 0.25
    assert np.mean([r["shape"] == s.shape for r, s in zip(named, scenes)]) < 0.4


def test_coupling_keeps_the_noise_standard_normal_and_touches_only_the_patterns():
    scenes = sample_scenes(4000, seed=2)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(4000, 4, 8, 8, generator=g)
    out = coupling.couple(noise, scenes, [set()] * 4000, g)
    flat = out.reshape(4000, -1)
    proj = flat @ coupling.patterns().T
    assert abs(float(flat.mean())) < 0.01 and abs(float(flat.std()) - 1) < 0.01
    assert (proj.std(0) - 1).abs().max() < 0.06 and proj.mean(0).abs().max() < 0.06
    # the part orthogonal to the patterns is the original noise
    p = coupling.patterns()
    rest = lambda x: x - (x @ p.T) @ p  # noqa: E731
    torch.testing.assert_close(rest(flat), rest(noise.reshape(4000, -1)), atol=1e-4, rtol=0)
