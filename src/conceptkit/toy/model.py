"""The toy model's architecture (Stable Diffusion's family, scaled down), its paths and loaders.

Components: an offline CLIP tokenizer over the world's words, a small `CLIPModel` (text and
vision towers), a 4x `AutoencoderKL` (32x32x3 images <-> 8x8x4 latents), a
`UNet2DConditionModel` conditioned on the frozen text tower's last hidden state, and a DDIM
scheduler with v-prediction on a cosine schedule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from conceptkit.errors import ModelNotFoundError
from conceptkit.tokenizer import build_clip_tokenizer
from conceptkit.toy.world import IMAGE_SIZE, vocabulary

CONTEXT_LENGTH = 16  # tokens of text context (BOS + at most 12 words + EOS + padding)
LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 4


def weights_path() -> Path:
    """The folder of the shipped toy model, in diffusers `StableDiffusionPipeline` format."""
    return Path(__file__).resolve().parent / "weights"


def clip_path() -> Path:
    """The folder of the full toy CLIP (text and vision towers with projections)."""
    return weights_path() / "clip"


def _defaults_file() -> Path:
    return Path(__file__).resolve().parent / "defaults.json"


def sampling_defaults() -> dict:
    """Sampling settings that gave the best fidelity: {"steps", "guidance", ...}."""
    path = _defaults_file()
    if path.exists():
        return json.loads(path.read_text())
    return {"steps": 20, "guidance": 3.0}


@dataclass(frozen=True)
class ToyArchitecture:
    """Sizes of the toy model's networks."""

    text_hidden: int = 64  # CLIP text tower width; also the UNet's cross-attention dim
    text_layers: int = 4
    vision_hidden: int = 64
    vision_layers: int = 4
    patch_size: int = 8  # 32x32 image -> 4x4 patches
    projection_dim: int = 64  # shared CLIP embedding size
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels -> 4x downsampling
    unet_channels: tuple[int, ...] = (48, 96)
    unet_heads: int = 4  # diffusers' `attention_head_dim` (number of heads in SD-1 UNets)

    def __post_init__(self) -> None:
        if len(self.vae_channels) != 3:
            raise ValueError("vae_channels needs 3 levels for 4x downsampling (32x32 -> 8x8)")
        if IMAGE_SIZE % self.patch_size:
            raise ValueError(f"patch_size must divide {IMAGE_SIZE}")
        if any(c <= 0 for c in (*self.vae_channels, *self.unet_channels)):
            raise ValueError("channel counts must be positive")


def build_tokenizer():
    """The toy CLIP tokenizer: every word of the world's captions is one token."""
    return build_clip_tokenizer(vocabulary(), max_length=CONTEXT_LENGTH)


def build_clip(arch: ToyArchitecture, vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int):
    """A fresh `transformers.CLIPModel` of the toy's size."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=vocab_size, hidden_size=arch.text_hidden, intermediate_size=4 * arch.text_hidden,
        num_hidden_layers=arch.text_layers, num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, projection_dim=arch.projection_dim,
    )
    vision = dict(
        hidden_size=arch.vision_hidden, intermediate_size=4 * arch.vision_hidden, num_hidden_layers=arch.vision_layers,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=arch.patch_size, projection_dim=arch.projection_dim,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch.projection_dim)
    return CLIPModel(config)


def build_vae(arch: ToyArchitecture):
    """A fresh 4x `AutoencoderKL` (scaling_factor is set after training from the latent std)."""
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=arch.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=16, sample_size=IMAGE_SIZE,
    )


def build_unet(arch: ToyArchitecture):
    """A fresh `UNet2DConditionModel` on 8x8x4 latents, cross-attending to the text tower."""
    from diffusers import UNet2DConditionModel

    n = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=arch.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=arch.text_hidden, attention_head_dim=arch.unet_heads, norm_num_groups=16,
    )


def build_scheduler():
    """DDIM with v-prediction on the cosine schedule (`steps_offset=1`, as SD pipelines expect)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
    )


def _pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_embeds(clip, pixel_values):
    """Unit-norm CLIP image embeddings (works across transformers 4 and 5 return types).

    Args:
        clip: a `CLIPModel`.
        pixel_values: (N, 3, 32, 32) float in [-1, 1] (the toy CLIP's input range).
    Returns:
        (N, projection_dim) float tensor.
    """
    return torch.nn.functional.normalize(_pooled(clip.get_image_features(pixel_values=pixel_values)), dim=-1)


def text_embeds(clip, input_ids):
    """Unit-norm CLIP text embeddings.

    Args:
        clip: a `CLIPModel`.
        input_ids: (N, L) token ids.
    Returns:
        (N, projection_dim) float tensor.
    """
    return torch.nn.functional.normalize(_pooled(clip.get_text_features(input_ids=input_ids)), dim=-1)


def load_pipeline(path: str | Path | None = None, device: str = "cpu"):
    """Load the toy `StableDiffusionPipeline` (plain `from_pretrained`, offline).

    Args:
        path: weights folder; the shipped `weights_path()` when None.
        device: torch device.
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else weights_path()
    if not (folder / "model_index.json").exists():
        raise ModelNotFoundError(f"no toy weights at {folder}; train them with `python -m conceptkit.toy.train`")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_clip(path: str | Path | None = None):
    """Load the toy CLIP and its tokenizer: returns (`CLIPModel`, `CLIPTokenizer`) in eval mode.

    Args:
        path: folder holding the CLIP (`config.json`, safetensors, tokenizer files); `clip_path()` when None.
    """
    from transformers import CLIPModel, CLIPTokenizer

    folder = Path(path) if path is not None else clip_path()
    if not (folder / "config.json").exists():
        raise ModelNotFoundError(f"no toy CLIP at {folder}; train it with `python -m conceptkit.toy.train --stages clip`")
    return CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
