"""The prompt-edit reference row of `bench/sliders.py factors` on the shipped toy."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def test_prompt_edits_name_the_factor_from_the_window_on():
    from bench.sliders import EDITS, prompt_edits
    from conceptkit.models import load_model

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
