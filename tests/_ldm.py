"""Test helper: write a diffusers SD / SDXL pipeline as one LDM-layout (CompVis) `.safetensors` file.

The inverse of diffusers' single-file conversion (`diffusers/loaders/single_file_utils.py`:
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`), the same mapping as diffusers'
`scripts/convert_diffusers_to_original_stable_diffusion.py` and `..._sdxl.py`. Only what the
tiny test models need is covered: UNet, VAE, CLIP text encoder (SD 1.x; SD 2.x's OpenCLIP layout
on request), and for SDXL the two
`conditioner.embedders` (OpenAI CLIP, then OpenCLIP with fused q/k/v).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
          ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _resnet(rest: str) -> str:
    for new, old in RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> `model.diffusion_model.*` keys."""
    per = config["layers_per_block"] + 1  # LDM blocks per diffusers down block (resnets + down/upsampler)
    up_has_attn = {i: "CrossAttn" in t for i, t in enumerate(config["up_block_types"])}
    out = {}
    for key, value in state.items():
        head, _, param = key.rpartition(".")
        if head in UNET_TOP:
            new = f"{UNET_TOP[head]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            slot = 2 if up_has_attn[int(m[1])] else 1
            new = f"output_blocks.{int(m[1]) * per + per - 1}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> `first_stage_model.*` keys."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            rest = m[2]
            for a, b in VAE_ATTN:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
            new = f"{m[1]}.mid.attn_1.{rest}"
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        new = new.replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI-CLIP text encoder (transformers layout, kept as is) under `prefix` + `text_model.`."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP layout (fused in_proj, transposed text_projection)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:  # SDXL's second encoder; SD 2.x's has no projection in diffusers
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state.pop(src + f"self_attn.{p}_proj.{kind}") for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = state.pop(src + f"self_attn.out_proj.{kind}")
            out[dst + f"ln_1.{kind}"] = state.pop(src + f"layer_norm1.{kind}")
            out[dst + f"ln_2.{kind}"] = state.pop(src + f"layer_norm2.{kind}")
            out[dst + f"mlp.c_fc.{kind}"] = state.pop(src + f"mlp.fc1.{kind}")
            out[dst + f"mlp.c_proj.{kind}"] = state.pop(src + f"mlp.fc2.{kind}")
    leftover = [k for k in state if not k.endswith("position_ids")]
    if leftover:
        raise KeyError(f"unmapped OpenCLIP keys {leftover[:3]}")
    return out


def save_ldm_checkpoint(pipe, path: Path, *, open_clip: bool = False) -> Path:
    """Write `pipe` (SD 1.x or SDXL) as one LDM-layout `.safetensors` file; returns `path`.

    Args:
        open_clip: for an SD pipeline, store the text encoder in SD 2.x's OpenCLIP layout
            (`cond_stage_model.model.*`) instead of SD 1.x's (`cond_stage_model.transformer.*`).
    """
    state = {}
    state.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if hasattr(pipe, "text_encoder_2"):
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    elif open_clip:
        state.update(open_clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.model."))
    else:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    return path
