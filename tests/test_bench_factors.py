"""The prompt-edit reference row of `bench/sliders.py factors` on the shipped toy."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def test_prompt_edits_name_the_factor_from_the_window_on():
    from bench.sliders import EDITS, prompt_edits
    from conceptkit.models.load import load_model

    torch.manual_seed(0)
    model = load_model("toy", device="cpu")
    sset = SimpleNamespace(prompt="a shape", manifest={"steps": 10, "guidance": 3.0, "start": 0.1})
    out = prompt_edits(model, sset, seeds=[11, 12, 13])
    rows = {r["label"]: r for r in out["per_slider"]}
    assert list(rows) == [f"{lo}/{hi}" for _, lo, hi in EDITS]
    # red at one end and blue at the other: every readable seed changes colour, and it is the main change
    colour = rows["red/blue"]
    assert colour["main"] == "colour" and colour["change"]["colour"] == 1.0
    assert rows["left/right"]["change"]["position"] == 1.0
    assert 0 < out["mean_purity"] <= 1 and out["n_covered"] >= 2


def test_stages_reads_each_factor_basis_as_that_factor():
    """`bench/sliders.py stages`: the toy CLIP's factor subspaces from rendered scenes; a direction taken from one
    factor's subspace is read as that factor, with its in-span share 1, and a random direction lies mostly outside."""
    import numpy as np

    from bench.stages import describe, factor_bases
    from conceptkit.features import load_encoder

    torch.manual_seed(0)
    bases, emb = factor_bases(load_encoder("toy", "toy"), 600)
    assert {g: len(b) for g, b in bases.items()} == {"colour": 7, "shape": 3, "size": 2, "position": 4, "background": 2}
    assert emb.shape == (600, 64)
    picks = np.stack([bases[g][0] for g in bases])
    d = describe(picks, bases)
    assert d["mains"] == list(bases) and min(r["purity"] for r in d["per_direction"]) > 0.99
    assert d["mean_in_factor_span"] > 0.99
    rnd = describe(np.random.default_rng(0).standard_normal((4, 64)), bases)
    assert rnd["mean_in_factor_span"] < 0.6
