"""The tiny built-in models `tiny-sd` and `tiny-sdxl`: random weights, real architectures.

Built from config with a fixed seed, the way diffusers' own fast tests build theirs
(`get_dummy_components()` in `tests/pipelines/stable_diffusion/test_stable_diffusion.py` and
`tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py`): a UNet with
block_out_channels (32, 64), a 2x AutoencoderKL, CLIP text encoders of width 32 (and 64 for
SDXL's second one), DDIM with `steps_offset=1`, and an offline CLIP tokenizer (deterministic
BPE) in which each word below is one token. They draw nothing meaningful; they exist so that every stage can be
tested and dry-run on a CPU in well under a second per image. Default image: 32x32 pixels
(16x16x4 latents).
"""

from __future__ import annotations


import torch

from conceptkit.errors import UsageError
from conceptkit.tokenizer import build_clip_tokenizer

TINY_NAMES = ("tiny-sd", "tiny-sdxl")
SEED = 0  # every module is built right after torch.manual_seed(SEED): same weights in every process
CONTEXT_LENGTH = 77  # tokens, as in real SD text encoders
IMAGE_SIZE = 32  # default image side in pixels; the UNet's sample_size is IMAGE_SIZE // 2

# A few hundred everyday words, each of which becomes a single token. Other text still works:
# it falls back to one token per character.
WORDS = """
a an the of and or with without in on at by to from for under over near behind above below
photo photograph picture image painting drawing sketch illustration render portrait landscape
close up view shot scene style art artwork digital oil watercolor pencil cartoon anime realistic
detailed simple high quality low dark light bright colorful black white red orange yellow green
blue purple pink brown gray grey gold silver big small large tiny huge little tall short long
old young new round square circle triangle star heart line shape pattern background foreground
man woman person people child boy girl baby face hand eye hair smile king queen doctor teacher
soldier chef artist farmer dancer worker student family friend crowd
dog cat bird fish horse cow sheep pig lion tiger bear wolf fox rabbit mouse elephant monkey
snake frog duck owl eagle butterfly bee spider dragon unicorn robot alien monster animal
tree flower rose grass leaf forest garden mountain hill river lake sea ocean beach island desert
sky cloud sun moon rain snow storm fire water stone rock sand ice field road street bridge
house home room kitchen door window wall roof city town village building castle tower church
car truck bus train boat ship plane bicycle wheel machine computer phone book table chair bed
lamp clock cup bottle bowl plate food apple banana cake bread pizza coffee tea wine fruit
shirt dress hat shoe coat glasses ring bag box ball toy guitar piano music game
morning night evening day summer winter spring autumn fall weather
happy sad angry calm beautiful ugly cute scary funny strange
running walking sitting standing flying swimming sleeping eating playing reading holding
wearing looking smiling jumping
one two three four five many few
""".split()


def build_tiny(name: str):
    """Build the tiny built-in pipeline `name` ("tiny-sd" or "tiny-sdxl"): fp32, on the CPU.

    Deterministic across processes: two builds have bit-identical weights.

    Args:
        name: "tiny-sd" (a `StableDiffusionPipeline`) or "tiny-sdxl" (a `StableDiffusionXLPipeline`).
    """
    if name == "tiny-sd":
        return _build_tiny_sd()
    if name == "tiny-sdxl":
        return _build_tiny_sdxl()
    raise UsageError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_NAMES)}")


def _tokenizer():
    """A CLIP BPE tokenizer in which each of WORDS is one token, identical in every process."""
    return build_clip_tokenizer(WORDS, max_length=CONTEXT_LENGTH)


def _text_config(tokenizer, hidden: int, projection_dim: int):
    """A small CLIP text tower whose vocabulary and special ids match `tokenizer`."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=projection_dim,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH, layer_norm_eps=1e-5,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=IMAGE_SIZE,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    # steps_offset=1: with 0 the pipeline rewrites the config in place and warns (STACK-NOTES).
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def _build_tiny_sd():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _tokenizer()
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
    )
    vae = _vae()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, projection_dim=32))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_tiny_sdxl():
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tokenizer()
    # The two text encoders have different widths (32 and 64), as in real SDXL (768 and 1280):
    # diffusers' single-file loader tells them apart by width.
    hidden_1, hidden_2, projection = 32, 64, 32
    time_embed = 8
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=6 * time_embed + projection,  # 6 size/crop ids + pooled text
        cross_attention_dim=hidden_1 + hidden_2, norm_num_groups=32,
    )
    vae = _vae()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=hidden_1, projection_dim=projection))
    torch.manual_seed(SEED)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, hidden=hidden_2, projection_dim=projection))
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer,
        tokenizer_2=_tokenizer(), unet=unet.eval(), scheduler=_scheduler(), add_watermarker=False,
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
