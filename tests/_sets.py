"""One briefly trained tiny-sd slider set, built once per test module in its own store."""

from __future__ import annotations

import pytest


def train_tiny_set(tmp_path_factory, *, count: int, samples: int, steps: int, lr: float, pairs: int = 2,
                   start: float = 0.1, encoder: str = "pixel", prompt: str = "a shape"):
    """(model, set): `count` sliders for `prompt` on tiny-sd, in a store of their own."""
    from conceptkit.models.load import load_model
    from conceptkit.sliders.train import TrainSettings
    from conceptkit.sliders.pipeline import SlidersConfig, run

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONCEPTKIT_HOME", str(home))
        model = load_model("tiny-sd", device="cpu")
        sset = run(model, SlidersConfig(prompt, count=count, samples=samples, encoder=encoder,
                                        train=TrainSettings(steps=steps, pairs=pairs, lr=lr, start=start)))
    return model, sset
