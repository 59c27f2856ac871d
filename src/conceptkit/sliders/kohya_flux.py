"""The kohya export of a FLUX.1 slider: keys in Black Forest Labs' own module names, fused layers included.

kohya sd-scripts' FLUX LoRAs, and what ComfyUI, Forge and diffusers load as kohya FLUX files, name
the original (BFL `flux` repository) modules: `lora_unet_double_blocks_{i}_img_attn_qkv`, ...
There the image stream's query, key and value are one fused `img_attn.qkv` (3H, H), the text
stream's `txt_attn.qkv` likewise, and a single block's q, k, v and MLP input one `linear1`
(3H + 4H, H); diffusers splits them (`attn.to_q`, `attn.to_k`, `attn.to_v`, `attn.add_k_proj`,
`proj_mlp`, ...). A slider on some of the parts of a fused layer is exactly a LoRA on the fused
layer whose down matrix stacks the parts' A (sum of ranks, in) and whose up matrix holds each
part's B in that part's rows, zero elsewhere: up @ down adds B_i A_i to rows i and nothing else.
The scale alpha / r is folded into B first, and each key's alpha is its total rank (scale 1).
"""

from __future__ import annotations

import re

import torch

from conceptkit.errors import UsageError
from conceptkit.sliders.files import SliderFactors, folded

MLP_RATIO = 4  # FLUX.1's MLP width / hidden width (diffusers' FluxSingleTransformerBlock default)

# diffusers module (regex) -> (BFL module template, the part's slot in the fused layer in units of H, fused rows in H)
# None: the whole layer (no fusion). Slots of linear1: q 0, k 1, v 2, MLP input 3..6.
_NAMES: tuple[tuple[str, str, dict[str, int] | None, int | None], ...] = (
    (r"transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v)", "double_blocks.{}.img_attn.qkv", {"to_q": 0, "to_k": 1, "to_v": 2}, 3),
    (r"transformer_blocks\.(\d+)\.attn\.(add_q_proj|add_k_proj|add_v_proj)", "double_blocks.{}.txt_attn.qkv",
     {"add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}, 3),
    (r"transformer_blocks\.(\d+)\.attn\.(to_out\.0)", "double_blocks.{}.img_attn.proj", None, None),
    (r"transformer_blocks\.(\d+)\.attn\.(to_add_out)", "double_blocks.{}.txt_attn.proj", None, None),
    (r"transformer_blocks\.(\d+)\.(ff\.net\.0\.proj)", "double_blocks.{}.img_mlp.0", None, None),
    (r"transformer_blocks\.(\d+)\.(ff\.net\.2)", "double_blocks.{}.img_mlp.2", None, None),
    (r"transformer_blocks\.(\d+)\.(ff_context\.net\.0\.proj)", "double_blocks.{}.txt_mlp.0", None, None),
    (r"transformer_blocks\.(\d+)\.(ff_context\.net\.2)", "double_blocks.{}.txt_mlp.2", None, None),
    (r"transformer_blocks\.(\d+)\.(norm1\.linear)", "double_blocks.{}.img_mod.lin", None, None),
    (r"transformer_blocks\.(\d+)\.(norm1_context\.linear)", "double_blocks.{}.txt_mod.lin", None, None),
    (r"single_transformer_blocks\.(\d+)\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp)", "single_blocks.{}.linear1",
     {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}, 3 + MLP_RATIO),
    (r"single_transformer_blocks\.(\d+)\.(proj_out)", "single_blocks.{}.linear2", None, None),
    (r"single_transformer_blocks\.(\d+)\.(norm\.linear)", "single_blocks.{}.modulation.lin", None, None),
)


def bfl_name(module: str) -> tuple[str, int | None, int | None]:
    """diffusers FLUX module path -> (BFL module path, the part's first row in units of H or None, fused rows in H).

    Args:
        module: e.g. `transformer_blocks.3.attn.add_k_proj` -> (`double_blocks.3.txt_attn.qkv`, 1, 3).
    """
    for pattern, template, slots, rows in _NAMES:
        m = re.fullmatch(pattern, module)
        if m:
            return template.format(m[1]), (slots[m[2]] if slots else None), rows
    raise UsageError(f"FLUX module {module!r} has no kohya (BFL) name; sliders for a kohya FLUX export go on "
                     "attention projections, MLPs and modulation layers of the double and single blocks")


def flux_tensors(factors: SliderFactors, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The kohya tensors of one FLUX slider: `lora_unet_<BFL path>.lora_down.weight`, `.lora_up.weight`, `.alpha`.

    Args:
        factors: the slider on diffusers' module names (linears only).
        dtype: of the down and up matrices.
    """
    factors = folded(factors)
    groups: dict[str, list[tuple[int | None, int | None, torch.Tensor, torch.Tensor]]] = {}
    for name in sorted(factors.lora_A):
        a, b = factors.lora_A[name], factors.lora_B[name]
        if a.ndim != 2:
            raise UsageError(f"FLUX slider module {name} is not a linear layer")
        target, slot, rows = bfl_name(name)
        groups.setdefault(target, []).append((slot, rows, a, b))
    out: dict[str, torch.Tensor] = {}
    for target, parts in sorted(groups.items()):
        key = "lora_unet_" + target.replace(".", "_")
        down = torch.cat([a for _, _, a, _ in parts])
        if parts[0][0] is None:  # a whole layer
            up = parts[0][3]
        else:  # parts of a fused layer: each B in its own rows
            unit = parts[0][3].shape[0] if parts[0][0] < 3 else parts[0][3].shape[0] // MLP_RATIO
            up = torch.zeros(parts[0][1] * unit, down.shape[0], dtype=down.dtype)
            col = 0
            for slot, _, a, b in parts:
                up[slot * unit: slot * unit + b.shape[0], col: col + a.shape[0]] = b
                col += a.shape[0]
        out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
    return out
