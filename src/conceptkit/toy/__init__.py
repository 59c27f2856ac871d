"""The toy world and the toy model: a small trained text-to-image model of a world whose factors we know.

World: one shape on a plain background at 32x32; factors shape, colour, size, horizontal and
vertical position, background, each sampled independently; captions name a random subset.
Model: Stable Diffusion's architecture scaled down (CLIP tokenizer and text tower, 4x
AutoencoderKL, UNet2DConditionModel, DDIM), shipped in diffusers format at `weights_path()`.
"""

from __future__ import annotations

from conceptkit.toy.analyse import AnalyserConfig, Reading, analyse, analyse_batch
from conceptkit.toy.model import (
    CONTEXT_LENGTH, clip_path, image_embeds, load_clip, load_pipeline, sampling_defaults, text_embeds, weights_path,
)
from conceptkit.toy.world import (
    FACTORS, IMAGE_SIZE, Scene, caption, factor_indices, prompt, random_captions, render, sample_scenes, vocabulary,
)

SAMPLING_DEFAULTS = sampling_defaults()


def describe() -> dict:
    """A description of the toy world and model for `conceptkit models` (JSON-able)."""
    folder = weights_path()
    return {
        "name": "toy",
        "description": (
            "conceptkit's built-in toy text-to-image model: Stable Diffusion's architecture scaled down "
            "(CLIP tokenizer and text tower, 4x AutoencoderKL, UNet2DConditionModel, DDIM with v-prediction), "
            "trained from scratch on a world of one shape on a plain background whose factors are known."
        ),
        "image_size": IMAGE_SIZE,
        "factors": {k: list(v) for k, v in FACTORS.items()},
        "caption_examples": ["a shape", prompt(colour="red"), prompt(size="large", colour="blue", shape="triangle", vertical="top",
                                                                       horizontal="left", background="black")],
        "vocabulary": vocabulary(),
        "context_length": CONTEXT_LENGTH,
        "weights": str(folder),
        "weights_present": (folder / "model_index.json").exists(),
        "sampling_defaults": dict(SAMPLING_DEFAULTS),
    }


__all__ = [
    "FACTORS", "IMAGE_SIZE", "CONTEXT_LENGTH", "SAMPLING_DEFAULTS", "AnalyserConfig", "Reading", "Scene",
    "analyse", "analyse_batch", "caption", "clip_path", "describe", "factor_indices", "image_embeds", "load_clip",
    "load_pipeline", "prompt", "random_captions", "render", "sample_scenes", "text_embeds", "vocabulary", "weights_path",
]
