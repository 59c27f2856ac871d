"""Test helper: which UNet weight each client patches for a LoRA key, rebuilt from its published naming rules.

Written from reading the clients' loaders, not copied:
- ComfyUI `comfy/lora.py` (`model_lora_keys_unet`, `load_lora`) with `comfy/utils.py`
  (`unet_to_diffusers`): a key `lora_unet_<name>` patches the LDM weight whose path, `.` -> `_`, is
  `<name>`, or the one diffusers' path `<name>` maps to; `<key>.lora_up.weight`, `.lora_down.weight`,
  `.alpha` are read, every other key is reported "lora key not loaded". Forge ships the same code
  (`packages_3rdparty/.../lora.py`).
- AUTOMATIC1111 `extensions-builtin/Lora/networks.py`: `convert_diffusers_name_to_compvis` turns a
  diffusers-style kohya name into the LDM module name (SD 1.x block arithmetic), then
  `network_layer_mapping` (LDM module paths, `.` -> `_`) is looked up, then `lora_unet` ->
  `diffusion_model` as it stands; `network.py` `detect_version` decides the SD version from the header.
- kohya sd-scripts `networks/lora.py` (`LoRANetwork.create_modules`): every Linear / Conv2d inside a
  Transformer2DModel, ResnetBlock2D, Downsample2D or Upsample2D, named `lora_unet_` + module path;
  the paths are diffusers' for SD 1.x (`library/original_unet.py`) and LDM for SDXL
  (`library/sdxl_original_unet.py`, where conv_in is `input_blocks.0.0` outside any such block).
The LDM paths themselves come from tests/_ldm.py, the checkpoint writer diffusers' own single-file
loader reads back (tests/test_models.py), so they do not depend on conceptkit's export code.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from _ldm import unet_to_ldm

KOHYA_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")


class Weight(NamedTuple):
    """A client's name for one UNet weight and its shape."""

    name: str
    shape: tuple[int, ...]


def module_weights(unet) -> dict[str, tuple[str, tuple[int, ...]]]:
    """diffusers module path -> (LDM module path, weight shape) for every weight of `unet` (meta is fine)."""
    out = {}
    for key, value in unet.state_dict().items():
        if key.endswith(".weight"):
            (ldm,) = unet_to_ldm({key: value}, unet.config)
            out[key.removesuffix(".weight")] = (ldm.removeprefix("model.diffusion_model.").removesuffix(".weight"),
                                                tuple(value.shape))
    return out


# ---------------------------------------------------------------- ComfyUI / Forge


def comfy_key_map(unet) -> dict[str, Weight]:
    """`model_lora_keys_unet`: LDM names and diffusers names, both as `lora_unet_<path with _>`."""
    out = {}
    for module, (ldm, shape) in module_weights(unet).items():
        out["lora_unet_" + ldm.replace(".", "_")] = Weight(ldm, shape)
        out["lora_unet_" + module.replace(".", "_")] = Weight(ldm, shape)
    return out


def comfy_load(file_shapes: dict[str, tuple[int, ...]], key_map: dict[str, Weight], peft: bool = False):
    """`load_lora` for plain LoRA keys: (patched {prefix: Weight}, keys it would report as not loaded).

    `peft`: diffusers/peft naming, `<x>.lora_B.weight` / `<x>.lora_A.weight` (what `load_lora` reads as its
    "diffusers2" form) instead of kohya's `lora_up` / `lora_down`."""
    patched, used = {}, set()
    for prefix, weight in key_map.items():
        up, down, alpha = f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight", f"{prefix}.alpha"
        if peft:
            up, down = f"{prefix}.lora_B.weight", f"{prefix}.lora_A.weight"
        if up in file_shapes:
            patched[prefix] = weight
            used |= {up, down} | ({alpha} if alpha in file_shapes else set())
    return patched, sorted(set(file_shapes) - used)


# ---------------------------------------------------------------- AUTOMATIC1111


_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                  "conv_shortcut": "skip_connection"}


def a1111_compvis_name(key: str) -> str:
    """`convert_diffusers_name_to_compvis` for UNet keys: SD 1.x block numbering (3 per block)."""
    if m := re.fullmatch(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.fullmatch(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.fullmatch(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = _RESNET_SUFFIX.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = _RESNET_SUFFIX.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = _RESNET_SUFFIX.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    return key


def a1111_layer_mapping(unet) -> dict[str, Weight]:
    """`network_layer_mapping`: the LDM model's module paths under `diffusion_model`, `.` -> `_`."""
    return {("diffusion_model." + ldm).replace(".", "_"): Weight(ldm, shape) for ldm, shape in module_weights(unet).values()}


def a1111_load(file_shapes: dict[str, tuple[int, ...]], mapping: dict[str, Weight]):
    """`load_network`'s matching: (matched {prefix: Weight}, keys that failed to match)."""
    matched, failed = {}, []
    for key in file_shapes:
        prefix, _, _ = key.partition(".")
        name = a1111_compvis_name(prefix)
        weight = mapping.get(name)
        if weight is None and "lora_unet" in prefix:  # "SDXL loras seem to already have correct compvis keys"
            weight = mapping.get(prefix.replace("lora_unet", "diffusion_model"))
        if weight is None:
            failed.append(key)
        else:
            matched[prefix] = weight
    return matched, failed


def a1111_sd_version(metadata: dict[str, str]) -> str:
    """`NetworkOnDisk.detect_version`; the LoRA tab hides a non-SDXL LoRA while an SDXL model is loaded."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


# ---------------------------------------------------------------- kohya sd-scripts


def kohya_modules(unet, sdxl: bool) -> dict[str, Weight]:
    """The LoRA modules sd-scripts' `LoRANetwork` creates (conv 3x3 included, as when loading weights)."""
    out = {}
    if not sdxl:  # its SD 1.x UNet has diffusers' module tree and class names
        for name, block in unet.named_modules():
            if type(block).__name__ in KOHYA_BLOCKS:
                for child, module in block.named_modules():
                    if type(module).__name__ in ("Linear", "Conv2d"):
                        path = f"{name}.{child}"
                        out["lora_unet_" + path.replace(".", "_")] = Weight(path, tuple(module.weight.shape))
        return out
    for ldm, shape in module_weights(unet).values():  # SDXL: LDM tree, blocks inside input/middle/output blocks
        inside = re.match(r"(input_blocks|middle_block|output_blocks)\.", ldm) and not ldm.startswith("input_blocks.0.")
        if inside and len(shape) in (2, 4):  # Linear / Conv2d, not the norms
            out["lora_unet_" + ldm.replace(".", "_")] = Weight(ldm, shape)
    return out


# ---------------------------------------------------------------- shapes


def fits(down: tuple[int, ...], up: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """Whether up @ down reshapes to `weight` the way every client computes it (LoRA / LoCon)."""
    r = down[0]
    if len(weight) == 2:
        return down == (r, weight[1]) and up == (weight[0], r)
    return len(weight) == 4 and down == (r, *weight[1:]) and up == (weight[0], r, 1, 1)


# ---------------------------------------------------------------- ComfyUI / Forge: FLUX.1
#
# Written from ComfyUI's published naming, not copied: `comfy/lora.py` `model_lora_keys_unet` gives every
# weight `diffusion_model.<BFL path>.weight` of a Flux model the key `lora_unet_<BFL path, . -> _>`, and, from
# `comfy/utils.py` `flux_to_diffusers`, the diffusers names `transformer.<path>` and
# `lora_transformer_<path, . -> _>`, a q / k / v (or single-block MLP input) patching its rows of the fused
# BFL weight. The BFL names: per double block `img_attn.qkv` (to_q, to_k, to_v), `txt_attn.qkv`
# (add_q_proj, add_k_proj, add_v_proj), `img_attn.proj` (attn.to_out.0), `txt_attn.proj` (attn.to_add_out),
# `img_mlp.0` / `.2` (ff.net.0.proj / ff.net.2), `txt_mlp.*` (ff_context), `img_mod.lin` (norm1.linear),
# `txt_mod.lin` (norm1_context.linear); per single block `linear1` (attn.to_q, to_k, to_v, proj_mlp, in that
# order), `linear2` (proj_out), `modulation.lin` (norm.linear).

_FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
                "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
_FLUX_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                      "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


class Slice(NamedTuple):
    """Where a diffusers layer sits in a BFL weight: the weight and its rows [start, start + rows)."""

    weight: Weight
    start: int
    rows: int


def flux_bfl_weights(transformer) -> dict[str, Slice]:
    """diffusers module path -> its place in the BFL state dict, for every block layer of a FluxTransformer2DModel."""
    mods = dict(transformer.named_modules())
    out: dict[str, Slice] = {}

    def add(prefix_from: str, prefix_to: str, plain: dict, fused: dict) -> None:
        for d, b in plain.items():
            w = mods[f"{prefix_from}.{d}"].weight
            out[f"{prefix_from}.{d}"] = Slice(Weight(f"{prefix_to}.{b}", tuple(w.shape)), 0, w.shape[0])
        for b, parts in fused.items():
            ws = [mods[f"{prefix_from}.{d}"].weight for d in parts]
            shape = (sum(w.shape[0] for w in ws), ws[0].shape[1])
            start = 0
            for d, w in zip(parts, ws):
                out[f"{prefix_from}.{d}"] = Slice(Weight(f"{prefix_to}.{b}", shape), start, w.shape[0])
                start += w.shape[0]

    for i in range(len(transformer.transformer_blocks)):
        add(f"transformer_blocks.{i}", f"double_blocks.{i}", _FLUX_DOUBLE, _FLUX_DOUBLE_FUSED)
    for i in range(len(transformer.single_transformer_blocks)):
        add(f"single_transformer_blocks.{i}", f"single_blocks.{i}", _FLUX_SINGLE, _FLUX_SINGLE_FUSED)
    return out


def comfy_flux_key_map(transformer) -> dict[str, Weight]:
    """`model_lora_keys_unet` for Flux: `lora_unet_<BFL>` per BFL weight, `transformer.<diffusers>` and
    `lora_transformer_<diffusers>` per diffusers layer (patching its rows of the BFL weight)."""
    out: dict[str, Weight] = {}
    for module, place in flux_bfl_weights(transformer).items():
        out["lora_unet_" + place.weight.name.replace(".", "_")] = place.weight
        out["transformer." + module] = place.weight
        out["lora_transformer_" + module.replace(".", "_")] = place.weight
    return out


_FLUX_NORMS = {"double": {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                          "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"},
               "single": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}}
_FLUX_BASIC = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
               "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
               "norm_out.linear": "final_layer.adaLN_modulation.1"}  # (scale, shift) in diffusers, (shift, scale) in BFL


def flux_bfl_state_dict(transformer) -> dict:
    """A FluxTransformer2DModel's weights in Black Forest Labs' layout (the naming above; fused q/k/v by rows)."""
    import torch

    sd = transformer.state_dict()
    out: dict = {}
    for module, place in flux_bfl_weights(transformer).items():
        for end in ("weight", "bias"):
            t = sd.get(f"{module}.{end}")
            if t is not None:
                full = out.setdefault(f"{place.weight.name}.{end}", torch.zeros((place.weight.shape[0],) + tuple(t.shape[1:])))
                full[place.start:place.start + place.rows] = t
    for kind, blocks, prefix in (("double", transformer.transformer_blocks, "transformer_blocks"),
                                 ("single", transformer.single_transformer_blocks, "single_transformer_blocks")):
        for i in range(len(blocks)):
            for d, b in _FLUX_NORMS[kind].items():
                out[f"{kind}_blocks.{i}.{b}.scale"] = sd[f"{prefix}.{i}.{d}.weight"]
    for d, b in _FLUX_BASIC.items():
        for end in ("weight", "bias"):
            t = sd.get(f"{d}.{end}")
            if t is not None:
                out[f"{b}.{end}"] = torch.cat(t.chunk(2)[::-1]) if d == "norm_out.linear" else t
    return out
