"""SliderSpace's defaults per kind of model, so a user needs no flag to get settings that fit it.

The toy and the built-in test models get quick settings measured on the toy (docs/sliders.md);
real SD 1.x/2.x, SDXL and few-step distilled models get the reference implementation's settings
(rohitgandikota/sliderspace `train_sdxl.py`: 1,000 images for the PCA, 3,000 training iterations,
learning rate 2e-3, rank 1, one image per iteration). Anything the user passes wins.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

BUILTIN_TEST_MODELS = ("tiny-sd", "tiny-sdxl", "random-sd15", "random-sdxl", "tiny-flux", "tiny-sd3", "random-flux")


@dataclass(frozen=True)
class SliderDefaults:
    """The settings a `sliders` run uses when the user does not pass them, and why."""

    profile: str  # toy | test-model | sd | sdxl | few-step
    samples: int  # harvested trajectories for the PCA
    train_steps: int  # optimiser steps
    pairs: int  # harvested (trajectory, step) pairs per optimiser step
    lr: float
    calibration_seeds: int  # seeds of the strength calibration (`sliders.calibrate`); 0: none
    directions: str  # pca | ica (`sliders.train.principal_directions`)
    x0: str  # all | final: which steps' x0 enter the directions
    why: str

    def as_dict(self) -> dict:
        return {"profile": self.profile, "samples": self.samples, "train_steps": self.train_steps,
                "pairs": self.pairs, "lr": self.lr, "calibration_seeds": self.calibration_seeds,
                "directions": self.directions, "x0": self.x0, "why": self.why}


QUICK = SliderDefaults("test-model", samples=16, train_steps=100, pairs=2, lr=5e-3, calibration_seeds=2, directions="pca",
                       x0="all", why="a built-in test model: quick settings")
TOY = SliderDefaults("toy", samples=256, train_steps=100, pairs=2, lr=5e-3, calibration_seeds=8, directions="ica", x0="final",
                     why="the toy: measured on it, the final images of 256 trajectories rotated to independent directions "
                         "are the purest sliders that also cover all four factors (docs/sliders.md)")
REFERENCE = SliderDefaults("sd", samples=1000, train_steps=3000, pairs=1, lr=2e-3, calibration_seeds=4, directions="pca",
                           x0="all", why="the SliderSpace reference settings: 1,000 images, 3,000 iterations, lr 2e-3")
PROFILES = {
    "toy": TOY,
    "test-model": QUICK,
    "sd": REFERENCE,
    "sdxl": replace(REFERENCE, profile="sdxl"),
    "few-step": replace(REFERENCE, profile="few-step",
                        why="a few-step distilled model (the reference's own SDXL-DMD setting): 1,000 images, "
                            "3,000 iterations, lr 2e-3, the model's own steps and guidance"),
}
FEW_STEP_MAX = 8  # a model whose default sampling takes at most this many steps is a few-step model


def profile_name(spec: str, arch: str, default_steps: int) -> str:
    """Which profile a model gets: by name for the built-ins, else by its sampling steps and architecture."""
    if spec == "toy":
        return "toy"
    if spec in BUILTIN_TEST_MODELS:
        return "test-model"
    if default_steps <= FEW_STEP_MAX:
        return "few-step"
    return "sdxl" if arch == "sdxl" else "sd"


def for_model(model) -> SliderDefaults:
    """The defaults for a loaded model (`conceptkit.models.load.LoadedModel`)."""
    return PROFILES[profile_name(model.spec, model.arch, model.default_steps)]


def resolve(defaults: SliderDefaults, **given) -> tuple[dict, list[str]]:
    """The user's values where given (not None), the profile's otherwise; and which came from the profile."""
    values, from_profile = {}, []
    for name, value in given.items():
        if value is None:
            values[name] = getattr(defaults, name)
            from_profile.append(name)
        else:
            values[name] = value
    return values, from_profile
