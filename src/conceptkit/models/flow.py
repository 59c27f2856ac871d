"""Flow-matching transformers: FLUX.1 (dev, schnell) and SD3 / SD3.5, their tiny built-ins and defaults.

`tiny-flux` (a `FluxPipeline`, guidance embedded like FLUX.1-dev) and `tiny-sd3` (a
`StableDiffusion3Pipeline`, classifier-free guidance) are built from config with a fixed seed,
the way diffusers' fast tests build theirs (`tests/pipelines/flux/test_pipeline_flux.py`,
`tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py`), except that the T5
encoder is built from config too (no `hf-internal-testing` download) with an offline T5 tokenizer
(`tokenizer.build_t5_tokenizer`). Transformer width 32, two double (joint) blocks and two single
blocks, a 2x VAE with 4 latent channels; default image 32x32 pixels (16x16x4 latents; FLUX packs
them into 8x8 tokens of 16). They draw noise; they exist to run every stage on a CPU in seconds.

The real transformers' published configurations are written here too (`REAL_TRANSFORMERS`), so
that their parameter counts are checked on the meta device without a download
(tests/test_flux.py).
"""

from __future__ import annotations

from typing import Any

import torch

from conceptkit.errors import UsageError
from conceptkit.models.tiny import WORDS
from conceptkit.tokenizer import build_clip_tokenizer, build_t5_tokenizer

FLOW_TINY_NAMES = ("tiny-flux", "tiny-sd3", "random-flux")  # built from config here (random-flux: benchmarks)
FLOW_BUILTINS = (  # (name, arch, description) for `conceptkit models`
    ("tiny-flux", "flux", "tiny random FLUX.1-dev-shaped pipeline (CLIP + T5, embedded guidance): tests, draws noise"),
    ("tiny-sd3", "sd3", "tiny random SD3-shaped pipeline (two CLIPs + T5, joint blocks): tests, draws noise"),
    ("random-flux", "flux", "FLUX.1-dev's depth (19 double, 38 single blocks) at width 256, random weights: benchmarks"),
)
NARROW_WIDTH = 256  # random-flux: 4 heads of 64 (FLUX.1: 24 heads of 128)
FLOW_ARCHS = ("flux", "sd3")
FLOW_PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
SEED = 0
CLIP_LENGTH = 77
T5_LENGTH = 32  # tokens the tiny models' T5 reads (the pipelines' max_sequence_length: 512 FLUX, 256 SD3)
IMAGE_SIZE = 32  # default image side of the tiny models, pixels

# The released transformers' configs (transformer/config.json of each repository), for the meta-device checks.
FLUX_DEV: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_SCHNELL: dict[str, Any] = {**FLUX_DEV, "guidance_embeds": False}
SD35_LARGE: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)
SD35_MEDIUM: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)
SD3_MEDIUM: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
REAL_TRANSFORMERS = {"flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL, "sd3.5-large": SD35_LARGE,
                     "sd3.5-medium": SD35_MEDIUM, "sd3-medium": SD3_MEDIUM}


def build_real_transformer(name: str, device: str | torch.device = "meta"):
    """The released transformer `name` (a key of REAL_TRANSFORMERS) with random weights, by default on meta (no memory)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if name not in REAL_TRANSFORMERS:
        raise UsageError(f"unknown transformer {name!r}; choose one of {', '.join(REAL_TRANSFORMERS)}")
    cls = FluxTransformer2DModel if name.startswith("flux") else SD3Transformer2DModel
    with torch.device(device):
        return cls(**REAL_TRANSFORMERS[name])


# ---------------------------------------------------------------- the tiny built-ins


def build_flow_tiny(name: str, guidance_embeds: bool = True):
    """Build `tiny-flux` (FluxPipeline) or `tiny-sd3` (StableDiffusion3Pipeline): fp32, CPU, deterministic.

    Args:
        name: one of FLOW_TINY_NAMES.
        guidance_embeds: tiny-flux only: a guidance embedding like FLUX.1-dev (True) or none like schnell.
    """
    if name == "tiny-flux":
        return _tiny_flux(guidance_embeds)
    if name == "random-flux":
        return _tiny_flux(True, depth=(FLUX_DEV["num_layers"], FLUX_DEV["num_single_layers"]), heads=NARROW_WIDTH // 64,
                          head_dim=64, rope=(16, 24, 24))
    if name == "tiny-sd3":
        return _tiny_sd3()
    raise UsageError(f"unknown tiny model {name!r}; choose one of {', '.join(FLOW_TINY_NAMES)}")


def _clip(hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer(WORDS, max_length=CLIP_LENGTH)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_LENGTH, layer_norm_eps=1e-5,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval(), tokenizer


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_t5_tokenizer(WORDS, max_length=T5_LENGTH)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)
    torch.manual_seed(SEED)
    return T5EncoderModel(config).eval(), tokenizer


def _vae(shift: float, scale: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=IMAGE_SIZE, use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale,
    ).eval()


def _tiny_flux(guidance_embeds: bool, depth: tuple[int, int] = (2, 2), heads: int = 2, head_dim: int = 16,
               rope: tuple[int, int, int] = (4, 6, 6)):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    text_encoder, tokenizer = _clip(32, projection=False)
    text_encoder_2, tokenizer_2 = _t5(32)
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=depth[0], num_single_layers=depth[1], attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=rope,
    ).eval()
    # FLUX.1's scheduler: resolution-dependent shift (FLUX.1-dev's scheduler_config.json), read by the pipeline
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(0.1159, 0.3611), text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.default_sample_size = IMAGE_SIZE // pipe.vae_scale_factor  # FluxPipeline hard-codes 128 (1024 px)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    text_encoder, tokenizer = _clip(32, projection=True)
    text_encoder_2, tokenizer_2 = _clip(32, projection=True)
    text_encoder_3, tokenizer_3 = _t5(64)  # joint_attention_dim: the T5 width, at least the two CLIPs side by side
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        out_channels=4, pos_embed_max_size=IMAGE_SIZE // 2,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's scheduler_config.json
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae(0.0609, 1.5305), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- what every loaded flow model needs


def is_flow(model_or_arch) -> bool:
    """Whether a `LoadedModel` (or an arch name) is a flow-matching transformer (FLUX or SD3)."""
    arch = model_or_arch if isinstance(model_or_arch, str) else getattr(model_or_arch, "arch", "")
    return arch in FLOW_ARCHS


def denoiser(pipe):
    """The network that predicts the noise / velocity: the UNet, or the transformer of FLUX / SD3."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def native_size(pipe) -> int:
    """The image side in pixels a pipeline draws when none is given."""
    if hasattr(pipe, "unet"):
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)


def has_guidance(pipe) -> bool:
    """Whether a flow pipeline takes a guidance scale: SD3's CFG, FLUX.1-dev's embedded guidance (not schnell's)."""
    if type(pipe).__name__ == "FluxPipeline":
        return bool(pipe.transformer.config.guidance_embeds)
    return True


def cfg_batches(model, guidance: float) -> bool:
    """Whether the denoiser's batch is [uncond; cond]: classifier-free guidance above 1, which FLUX never runs
    (its guidance is embedded: one batch)."""
    return guidance > 1.0 and getattr(model, "arch", "") != "flux"


def check_guidance(model, guidance: float | None) -> None:
    """Refuse an explicit guidance scale for a model that has none (FLUX.1-schnell), in one line."""
    if guidance is not None and is_flow(model) and not has_guidance(model.pipe):
        raise UsageError(f"{model.spec} has no guidance (a FLUX.1-schnell-style transformer without a guidance "
                         "embedding); drop --guidance")


def check_size(model, height: int | None, width: int | None) -> None:
    """Refuse an image side a flow model cannot draw as asked (the pipeline would silently round it down):
    FLUX packs 2x2 latents (multiples of 16 pixels on FLUX.1), SD3 cuts patches (16 pixels on SD3 / SD3.5)."""
    if not is_flow(model):
        return
    flux = type(model.pipe).__name__ == "FluxPipeline"
    step = int(model.pipe.vae_scale_factor) * (2 if flux else int(model.pipe.transformer.config.patch_size))
    for name, v in (("height", height), ("width", width)):
        if v is not None and v % step:
            raise UsageError(f"--{name} {v}: {model.spec} draws images whose sides are multiples of {step} pixels")


def flow_defaults(spec: str, names: str, pipe) -> tuple[int, float]:
    """(steps, guidance) that suit a flow model.

    schnell (no guidance embedding): 4 steps, guidance 0 (unused); dev: 28 steps, embedded guidance 3.5;
    SD3 / SD3.5: 28 steps, CFG 7.0, and a Turbo (timestep-distilled SD3.5) 4 steps without guidance.
    The tiny built-ins take 4 steps, with guidance 3.5 (tiny-flux) and 7.0 (tiny-sd3).
    """
    flux = type(pipe).__name__ == "FluxPipeline"
    if flux and not pipe.transformer.config.guidance_embeds:
        return 4, 0.0
    if spec in FLOW_TINY_NAMES:
        return 4, 3.5 if flux else 7.0  # random-flux too: benchmarks pass their own steps
    if flux:
        return 28, 3.5
    if "turbo" in names.lower():
        return 4, 0.0
    return 28, 7.0


def pipeline_kwargs(pipe) -> dict[str, Any]:
    """Extra arguments every call of a flow pipeline takes: the T5 length of its tokenizer when shorter
    than the pipeline's default (512 FLUX, 256 SD3): the tiny models read 32 T5 tokens."""
    if type(pipe).__name__ not in FLOW_PIPELINES:
        return {}
    flux = type(pipe).__name__ == "FluxPipeline"
    length = getattr(getattr(pipe, "tokenizer_2" if flux else "tokenizer_3", None), "model_max_length", None)
    return {"max_sequence_length": int(length)} if length is not None and length < (512 if flux else 256) else {}
