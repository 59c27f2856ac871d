"""diffusers UNet module names -> the original LDM / sgm names (`input_blocks.4.1...`) of SDXL.

The layout of Rombach et al. (2022) as Stability's `generative-models` code builds SDXL (Podell
et al., 2023): `input_blocks[n]` holds one resnet (`.0`) and maybe one transformer (`.1`),
`1 + block * (layers + 1) + layer`, the downsampler last in each block (`.0.op`); the output
side the same with layers + 1 resnets, the upsampler after the transformer (`.2.conv`) or the
resnet (`.1.conv`). Inside a resnet, diffusers' `conv1` is `in_layers.2`, `conv2` `out_layers.3`,
`time_emb_proj` `emb_layers.1`, `conv_shortcut` `skip_connection`. kohya sd-scripts' SDXL tools,
ComfyUI and AUTOMATIC1111 name SDXL LoRA modules this way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from conceptkit.errors import UsageError

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


@dataclass(frozen=True)
class UnetLayout:
    """The block structure the LDM numbering depends on; the default is SDXL base's (and its fine-tunes')."""

    layers_per_block: int = 2  # resnets per down block; up blocks have one more
    blocks: int = 3  # down (and up) blocks
    up_attention: frozenset[int] = frozenset({0, 1})  # up blocks with transformers (their upsampler is .2)

    def __post_init__(self) -> None:
        if self.layers_per_block < 1 or self.blocks < 1:
            raise ValueError(f"layers_per_block and blocks must be >= 1, got {self.layers_per_block}, {self.blocks}")


SDXL = UnetLayout()


def _resnet(rest: str, module: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET or tail:
        raise UsageError(f"module {module!r} has no LDM name (a resnet has {', '.join(_RESNET)})")
    return _RESNET[head]


def ldm_module_name(module: str, layout: UnetLayout = SDXL) -> str:
    """The LDM name of a diffusers UNet module, e.g. `down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in`; UsageError for a name outside `layout`."""
    per = layout.layers_per_block + 1
    if module in _TOP:
        return _TOP[module]

    def check(block: int, layer: int, layers: int) -> None:
        if block >= layout.blocks or layer >= layers:
            raise UsageError(f"module {module!r} lies outside the SDXL UNet layout ({layout.blocks} blocks of "
                             f"{layout.layers_per_block} layers): not an SDXL model")

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        block, layer = int(m[1]), int(m[3])
        check(block, layer, layout.layers_per_block)
        n = 1 + block * per + layer
        return f"input_blocks.{n}.0.{_resnet(m[4], module)}" if m[2] == "resnets" else f"input_blocks.{n}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        check(int(m[1]), 0, 1)
        return f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", module):
        check(0, int(m[1]), 2)  # resnet, transformer, resnet
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], module)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        block, layer = int(m[1]), int(m[3])
        check(block, layer, per)
        n = block * per + layer
        return f"output_blocks.{n}.0.{_resnet(m[4], module)}" if m[2] == "resnets" else f"output_blocks.{n}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        block = int(m[1])
        check(block, 0, 1)
        return f"output_blocks.{block * per + per - 1}.{2 if block in layout.up_attention else 1}.conv"
    raise UsageError(f"module {module!r} is not a module of a diffusers UNet2DConditionModel with an LDM name")
