"""The built-in models `random-sd15` and `random-sdxl`: full-size architectures, random weights.

Speed does not depend on weight values, and weights cannot be downloaded here, so the benchmarks
build Stable Diffusion 1.5 and SDXL base 1.0 from their published configurations (the `config.json`
of each component in the model repositories) with random weights. They draw noise; they exist to
time and size every code path at real scale (`python -m bench --arch sd15|sdxl`).

Parameter counts (checked in tests/test_full_models.py on the meta device, no memory used):
SD 1.5 UNet 859,520,964; SDXL UNet 2,567,463,684; CLIP ViT-L/14 text 123,060,480; OpenCLIP
ViT-bigG/14 text with projection 694,659,840; VAE 83,653,863.
"""

from __future__ import annotations

from typing import Any

import torch

from conceptkit.errors import UsageError
from conceptkit.models.tiny import WORDS
from conceptkit.tokenizer import build_clip_tokenizer

FULL_NAMES = ("random-sd15", "random-sdxl")
SEED = 0
CONTEXT_LENGTH = 77

SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)

VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)

CLIP_L_TEXT: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
BIGG_TEXT: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=20, projection_dim=1280, hidden_act="gelu")


def _tokenizer():

    return build_clip_tokenizer(WORDS, max_length=CONTEXT_LENGTH)


def text_config(tokenizer, spec: dict[str, Any]):
    """A CLIP text tower of the published width and depth; vocabulary as CLIP's (49,408 tokens)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=CONTEXT_LENGTH, layer_norm_eps=1e-5,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **spec)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                         timestep_spacing="leading")


def build_full(name: str, device: str | torch.device = "cpu"):
    """Build `random-sd15` (StableDiffusionPipeline) or `random-sdxl` (StableDiffusionXLPipeline) in fp32.

    Args:
        name: one of FULL_NAMES.
        device: where the weights are created; "meta" builds the structure without memory (tests).
    """
    if name not in FULL_NAMES:
        raise UsageError(f"unknown full-size model {name!r}; choose one of {', '.join(FULL_NAMES)}")
    with torch.device(device):
        return _build(name)


def _build(name: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tokenizer()
    torch.manual_seed(SEED)
    if name == "random-sd15":
        from diffusers import StableDiffusionPipeline

        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(sample_size=512, scaling_factor=0.18215, **VAE)
        text_encoder = CLIPTextModel(text_config(tokenizer, CLIP_L_TEXT))
        pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                       unet=unet.eval(), scheduler=_scheduler(), safety_checker=None,
                                       feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    else:
        from diffusers import StableDiffusionXLPipeline

        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(sample_size=1024, scaling_factor=0.13025, force_upcast=True, **VAE)
        text_encoder = CLIPTextModel(text_config(tokenizer, CLIP_L_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer, BIGG_TEXT))
        pipe = StableDiffusionXLPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(),
                                         text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer,
                                         tokenizer_2=_tokenizer(), unet=unet.eval(), scheduler=_scheduler(),
                                         add_watermarker=False, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
