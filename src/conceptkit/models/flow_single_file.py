"""Single-file FLUX.1 and SD3 checkpoints: the transformer from the file, everything else from a config folder.

A FLUX.1 file (`flux1-dev.safetensors`, Black Forest Labs' layout: `double_blocks.*`, `single_blocks.*`,
optionally under ComfyUI's `model.diffusion_model.`) holds the transformer only; an SD3 / SD3.5
file (Stability's layout: `joint_blocks.*` under `model.diffusion_model.`) may hold its text encoders
and VAE too. Either way conceptkit takes the transformer from the file and the text encoders, VAE,
tokenizers and scheduler from a diffusers folder (`--config`, or the canonical repository of the
variant: FLUX.1-dev for a file with a guidance embedder, FLUX.1-schnell without, SD3.5 Large for
SD3). SD3 goes through diffusers' `SD3Transformer2DModel.from_single_file`; FLUX's converter in
diffusers assumes FLUX.1's width (3072), so FLUX files are renamed here, by the same names
(BFL module -> diffusers module, fused q/k/v split by rows), at any width.
"""

from __future__ import annotations

import re

import torch

from conceptkit.errors import UnsupportedModelError

FLUX_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FLOW_CONFIG_REPOS = {
    "flux": ("black-forest-labs/FLUX.1-dev",),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell",),
    "sd3": ("stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium",
            "stabilityai/stable-diffusion-3-medium-diffusers"),
}
MLP_RATIO = 4  # FLUX.1's single blocks: linear1 = q, k, v (H each) then the MLP input (4H)

_DOUBLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj",
           "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
           "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
           "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
           "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
           "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear", "norm.query_norm.scale": "attn.norm_q.weight",
           "norm.key_norm.scale": "attn.norm_k.weight"}
_BASIC = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
          "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
          "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
          "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
          "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
          "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
          "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
          "final_layer.adaLN_modulation.1": "norm_out.linear"}


def strip_prefix(keys) -> list[str]:
    return [next((k[len(p):] for p in FLUX_PREFIXES if k.startswith(p)), k) for k in keys]


def flow_file_arch(keys) -> str | None:
    """"flux" (a guidance embedder: FLUX.1-dev-like), "flux-schnell", "sd3", or None for another layout."""
    plain = strip_prefix(keys)
    if any(k.startswith("double_blocks.") for k in plain):
        if "img_in.weight" not in plain:
            raise UnsupportedModelError("the file looks like a FLUX transformer but has no img_in.weight (a LoRA or a partial file?)")
        return "flux" if any(k.startswith("guidance_in.") for k in plain) else "flux-schnell"
    if any(k.startswith("joint_blocks.") for k in plain):
        return "sd3"
    return None


def flux_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL-layout FLUX.1 state dict renamed to diffusers' `FluxTransformer2DModel` (any width).

    Args:
        state: tensors by BFL name, with or without ComfyUI's `model.diffusion_model.` prefix.
    """
    state = dict(zip(strip_prefix(state), state.values()))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name, _, end = key.rpartition(".")
        m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", name)
        if m is None:
            if name in _BASIC:
                if name == "final_layer.adaLN_modulation.1":  # BFL: (shift, scale); diffusers: (scale, shift)
                    shift, scale = value.chunk(2, dim=0)
                    value = torch.cat([scale, shift], dim=0)
                out[f"{_BASIC[name]}.{end}"] = value
                continue
            raise UnsupportedModelError(f"FLUX file: tensor {key!r} has no diffusers name")
        kind, i, rest = m.groups()
        block = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{i}"
        plain, fused = (_DOUBLE, _DOUBLE_FUSED) if kind == "double" else (_SINGLE, {})
        if f"{rest}.{end}" in plain:  # the norms' `scale`
            out[f"{block}.{plain[f'{rest}.{end}']}"] = value
        elif rest in plain:
            out[f"{block}.{plain[rest]}.{end}"] = value
        elif rest in fused:
            for part, chunk in zip(fused[rest], value.chunk(3, dim=0)):
                out[f"{block}.{part}.{end}"] = chunk
        elif kind == "single" and rest == "linear1":
            h = state[f"single_blocks.{i}.linear2.weight"].shape[0]
            parts = value.split([h, h, h, MLP_RATIO * h], dim=0)
            for part, chunk in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
                out[f"{block}.{part}.{end}"] = chunk
        else:
            raise UnsupportedModelError(f"FLUX file: tensor {key!r} has no diffusers name")
    return out


def load_flow_transformer(path, family: str, config_dir, label: str, dtype: torch.dtype = torch.float32):
    """The transformer of a FLUX or SD3 single file, with the architecture of `config_dir`/transformer, on the CPU
    in `dtype` (float32, or the half dtype the file is stored in: `models/memory.py`). FLUX's is built on the meta
    device and takes the file's tensors as its own (`assign`), so its weights exist once, never in float32 first."""
    import diffusers
    from safetensors.torch import load_file

    try:
        if family == "sd3":
            return diffusers.SD3Transformer2DModel.from_single_file(
                str(path), config=str(config_dir), subfolder="transformer", local_files_only=True, torch_dtype=dtype)
        cls = diffusers.FluxTransformer2DModel
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(str(config_dir), subfolder="transformer"))
        state = {k: v.to(dtype) for k, v in flux_to_diffusers(load_file(str(path))).items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except UnsupportedModelError:
        raise
    except Exception as err:  # shapes that do not fit, a broken file: one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UnsupportedModelError(f"could not load {path.name} with config {label}: {first[:300]}") from err
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UnsupportedModelError(f"{path.name} does not fit the transformer of config {label} ({what}); "
                                    "pass the --config of the same FLUX variant")
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # a buffer the file does not hold (none in diffusers 0.42's FluxTransformer2DModel)
        raise UnsupportedModelError(f"{path.name}: the transformer's {left[0]} was not in the file")
    return model.eval()
