"""The full-size random builtins match the published architectures (checked without memory, on meta)."""

from __future__ import annotations

import pytest
import torch

from conceptkit.models.full import FULL_NAMES, build_full
from conceptkit.errors import UsageError


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# Parameter counts of the published checkpoints' components (SD 1.5; SDXL base 1.0).
PUBLISHED = {
    "random-sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "random-sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                    "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("name", FULL_NAMES)
def test_published_parameter_counts(name):
    pipe = build_full(name, device="meta")
    for component, expected in PUBLISHED[name].items():
        assert _count(getattr(pipe, component)) == expected, component


def test_sdxl_shapes_match_its_conditioning():
    pipe = build_full("random-sdxl", device="meta")
    cfg = pipe.unet.config
    # cross-attention reads both text towers side by side; the added embedding takes the pooled bigG
    # projection plus six 256-wide size/crop embeddings
    assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.projection_class_embeddings_input_dim == pipe.text_encoder_2.config.projection_dim + 6 * 256
    assert pipe.vae.config.force_upcast and abs(pipe.vae.config.scaling_factor - 0.13025) < 1e-9


def test_unknown_name():
    with pytest.raises(UsageError):
        build_full("random-sd3")


@pytest.mark.slow
def test_random_sd15_samples_at_small_size():
    from conceptkit.models.load import load_model

    model = load_model("random-sd15", device="cpu")
    out = model.pipe("a cat", num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
