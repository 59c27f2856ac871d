"""Which layers a slider sits on, per architecture, and what the slider files call the network.

SD 1.x / 2.x / SDXL: the cross-attention key and value projections (`attn2.to_k`, `attn2.to_v`),
the only place the prompt enters a UNet (SliderSpace, Sec. 3.2, as Concept Sliders' `xattn`).

FLUX.1 and SD3 (MMDiT, Esser et al. 2024, Sec. 4) have no separate cross-attention: text and
image tokens attend jointly in one softmax. The prompt enters through the text stream's own key
and value projections (`attn.add_k_proj`, `attn.add_v_proj`), the counterpart of the UNet's
`attn2.to_k` / `to_v`; the image stream's `attn.to_k` / `to_v` decide what those text keys are
compared with and how image tokens mix. A slider that only moved the text keys/values could only
re-weight prompt tokens, so the default takes both streams' keys and values in every joint block,
and in FLUX's single blocks (one stream, text and image concatenated) their `attn.to_k` / `to_v`.
Queries, output projections and MLPs are left out, as in the UNet default (on FLUX.1: 19 x 4 + 38 x 2
= 152 layers, 0.93 M parameters per rank-1 slider, 0.008% of the transformer).
"""

from __future__ import annotations

from conceptkit.sliders.bank import DEFAULT_TARGETS

FLUX_TARGETS = r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn\.(to_k|to_v|add_k_proj|add_v_proj)"
SD3_TARGETS = r"transformer_blocks\.\d+\.attn\.(to_k|to_v|add_k_proj|add_v_proj)"  # not SD3.5's attn2 (image-only)
BY_ARCH = {"flux": FLUX_TARGETS, "sd3": SD3_TARGETS}
AUTO = "auto"


def default_targets(arch: str) -> str:
    """The regex of the layers sliders sit on by default for `arch` (sd1, sd2, sdxl, flux, sd3)."""
    return BY_ARCH.get(arch, DEFAULT_TARGETS)


def resolve_targets(targets: str | None, arch: str) -> str:
    """`--targets`: `auto` (or None) is the architecture's default; any other value is a regex used as given."""
    return default_targets(arch) if targets in (None, AUTO) else targets
