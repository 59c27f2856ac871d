"""The two kinds of layer a slider can sit on, nn.Linear and nn.Conv2d, and their routed LoRA branch.

Linear (Hu et al., 2021, "LoRA", Sec. 4.1): delta = B A x, A: (r, in), B: (out, r).
Conv2d, as kohya's LoCon and peft's LoRA conv layers do it: the down projection is a conv with the
layer's own kernel, stride and padding to r channels, the up projection a 1x1 conv, so
delta = B * conv(x, A), A: (r, in, kh, kw), B: (out, r) (stored in files as (out, r, 1, 1)).
The bank keeps K sliders per layer, A: (K, r, in[, kh, kw]) and B: (K, out, r).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """What a slider needs to know of its target layer."""

    kind: str  # "linear" | "conv"
    in_features: int  # in_features, or in_channels of a conv
    out_features: int  # out_features, or out_channels
    kernel: tuple[int, ...] = ()  # (kh, kw) of a conv, () for a linear
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()

    @property
    def fan_in(self) -> int:
        """Inputs each output of A sees: in, or in * kh * kw."""
        n = self.in_features
        for k in self.kernel:
            n *= k
        return n

    def a_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of one slider's A: (r, in) or (r, in, kh, kw)."""
        return (rank, self.in_features, *self.kernel)

    def file_b_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of B in a file: (out, r), or (out, r, 1, 1) for a conv (its 1x1 up projection)."""
        return (self.out_features, rank) if self.kind == "linear" else (self.out_features, rank, 1, 1)


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    """The `LayerSpec` of a target, or ValueError naming it when a slider cannot sit on it."""
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or tuple(module.dilation) != (1, 1) or module.padding_mode != "zeros":
            raise ValueError(f"{name} is a grouped, dilated or non-zero-padded Conv2d; sliders support plain "
                             "convolutions only (groups=1, dilation=1, zero padding)")
        return LayerSpec("conv", module.in_channels, module.out_channels, tuple(module.kernel_size),
                         tuple(module.stride), module.padding if isinstance(module.padding, str) else tuple(module.padding))
    raise ValueError(f"{name} is a {type(module).__name__}; sliders go on nn.Linear and nn.Conv2d layers only")


class Target(NamedTuple):
    """One module a `--targets` regex picked: its name, the module, the layer under it, the spec."""

    name: str
    module: nn.Module  # what the hook goes on (a peft LoRA layer stays itself)
    layer: nn.Module  # the nn.Linear / nn.Conv2d whose shape the slider takes (a peft layer's base_layer)
    spec: LayerSpec


def select_targets(unet: nn.Module, pattern: str) -> list[Target]:
    """The modules whose names `pattern` fully matches (peft's rule), or ValueError saying why none
    or which one cannot carry a slider."""
    regex = re.compile(pattern)
    found = [(n, m) for n, m in unet.named_modules() if n and regex.fullmatch(n)]
    if not found:
        raise ValueError(f"no module name matches {pattern!r}")
    names = {n for n, _ in found}
    out = []
    for name, module in found:
        layer = getattr(module, "base_layer", module)
        try:
            spec = layer_spec(name, layer)
        except ValueError as exc:
            raise ValueError(f"{exc} ({name} matches {pattern!r})") from None
        parts = name.split(".")
        if any(".".join(parts[:i]) in names for i in range(1, len(parts))):
            raise ValueError(f"{name} and a module around it both match {pattern!r}")
        out.append(Target(name, module, layer, spec))
    return out


def sparse_delta(spec: LayerSpec, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Each sample's own slider: delta_n = coef_n * B_n A_n x_n.

    Args:
        x: (N, ..., in) for a linear, (N, in, H, W) for a conv.
        a: (N, r, in[, kh, kw]) each sample's A; b: (N, out, r) its B; coef: (N,).
    Returns: (N, ..., out) or (N, out, H', W').
    """
    n = x.shape[0]
    if spec.kind == "linear":
        xf = x.reshape(n, -1, x.shape[-1])  # (N, T, in)
        h = torch.bmm(xf, a.transpose(1, 2)) * coef[:, None, None]  # (N, T, r)
        return torch.bmm(h, b.transpose(1, 2)).reshape(*x.shape[:-1], b.shape[1])  # (N, ..., out)
    r = a.shape[1]
    # one grouped conv runs every sample's own down projection: group n = sample n
    h = F.conv2d(x.reshape(1, n * x.shape[1], *x.shape[2:]), a.reshape(n * r, *a.shape[2:]),
                 stride=spec.stride, padding=spec.padding, groups=n)  # (1, N*r, H', W')
    h = h.reshape(n, r, *h.shape[2:]) * coef[:, None, None, None]
    return torch.einsum("nrhw,nor->nohw", h, b)


def dense_delta(spec: LayerSpec, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Every slider, weighted per sample: delta_n = sum_k coef[n, k] B_k A_k x_n.

    Args:
        x: as in `sparse_delta`; a: (K, r, in[, kh, kw]); b: (K, out, r); coef: (N, K).
    """
    n = x.shape[0]
    if spec.kind == "linear":
        xf = x.reshape(n, -1, x.shape[-1])
        h = torch.einsum("ntd,krd->ntkr", xf, a) * coef[:, None, :, None]
        return torch.einsum("ntkr,kor->nto", h, b).reshape(*x.shape[:-1], b.shape[1])
    k, r = a.shape[:2]
    h = F.conv2d(x, a.reshape(k * r, *a.shape[2:]), stride=spec.stride, padding=spec.padding)  # (N, K*r, H', W')
    h = h.reshape(n, k, r, *h.shape[2:]) * coef[:, :, None, None, None]
    return torch.einsum("nkrhw,kor->nohw", h, b)
