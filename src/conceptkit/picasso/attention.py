"""Cross-attention capture: a processor that materialises the attention probabilities of the
UNet's cross-attention layers (`.attn2`) and hands them, with the queries, keys and values, to a
sink; and the sink that turns them into per-neuron spatial contributions Fs.

A *neuron* is one output channel of a cross-attention `to_k` or `to_v` projection (Cones, Liu et
al. 2023, Sec. 3; Picasso, Cai et al.). The default SDPA processor never materialises the
probabilities, so `capture` swaps in `RecordingProcessor` (a copy of diffusers' `AttnProcessor`,
the same maths) on the `.attn2` entries only and restores the originals afterwards; the image
changes by about 1e-6 (STACK-NOTES).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import AttnProcessor

from conceptkit.diffusion import cross_attention_names  # noqa: F401  the layers, named once for every method

# sink(name, attn, query, key, value, probs, (h, w) or None); query/key/value (B*heads, n, dh), probs (B*heads, HW, L)
Sink = Callable[..., None]


class RecordingProcessor(AttnProcessor):
    """diffusers' `AttnProcessor` (explicit softmax), calling `sink` with the probabilities it computes."""

    def __init__(self, name: str, sink: Sink):
        self.name = name
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        # 1. the input, as diffusers' AttnProcessor prepares it
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        hw = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hw = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        # 2. projections and probabilities
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)
        # 3. hand them over (detached: recording never feeds back into the gradient)
        self.sink(self.name, attn, query.detach(), key.detach(), value.detach(), probs.detach(), hw)
        # 4. the rest of AttnProcessor
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def capture(unet, sink: Sink) -> Iterator[list[str]]:
    """Record every cross-attention layer of `unet` into `sink` inside the block; yields the layer names.

    Only the `.attn2` processors are replaced (via `unet.set_attn_processor`), and the original
    processors are put back on exit, even after an error.
    """
    names = cross_attention_names(unet)
    original = dict(unet.attn_processors)
    replaced = {
        key: (RecordingProcessor(key.removesuffix(".processor"), sink) if key.removesuffix(".processor") in names else proc)
        for key, proc in original.items()
    }
    unet.set_attn_processor(replaced)
    try:
        yield names
    finally:
        unet.set_attn_processor(original)


def spatial_size(positions: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with `positions` = h*w tokens in a UNet whose input is `latent_hw` (halving, rounding up)."""
    h, w = latent_hw
    while h * w > positions and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != positions:
        raise ValueError(f"cannot place {positions} positions on a {latent_hw[0]}x{latent_hw[1]} latent grid")
    return h, w


def neuron_contributions(query, key, value, probs, mask, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each key and value neuron's contribution at each position through the concept tokens (Picasso's Fs, per sample).

    Value neuron c (head h): Fs_v[b, p, c] = sum_s P[b, h, p, s] m[b, s] V[b, s, c], the part of the
    attention output that channel c carries from the concept tokens. Key neuron c: its share of
    the attention logit, weighted by the probability it earns, Fs_k[b, p, c] = sum_s P[b, h, p, s]
    m[b, s] scale q[b, p, c] K[b, s, c]. Channel c = h * dh + d, the projection's output order.

    Args:
        query: (B*heads, HW, dh); key, value: (B*heads, L, dh); probs: (B*heads, HW, L).
        mask: (B, L) float or bool, 1 on the concept's tokens.
        heads: number of heads; scale: the attention's logit scale.

    Returns:
        (fs_k, fs_v), each (B, HW, heads*dh) float32.
    """
    bh, hw, length = probs.shape
    b = bh // heads
    p = probs.float().view(b, heads, hw, length) * mask.to(probs.device, torch.float32)[:, None, None, :]
    v = value.float().view(b, heads, length, -1)
    k = key.float().view(b, heads, length, -1)
    q = query.float().view(b, heads, hw, -1)
    fs_v = torch.einsum("bhps,bhsd->bphd", p, v).reshape(b, hw, -1)
    fs_k = (q * scale * torch.einsum("bhps,bhsd->bhpd", p, k)).permute(0, 2, 1, 3).reshape(b, hw, -1)
    return fs_k, fs_v


@dataclass
class ConceptSink:
    """Accumulates, per cross-attention layer, the sum over samples of each neuron's Fs map and its activation.

    Set `mask` (B, L) before each forward pass: batch rows beyond `mask`'s (e.g. the unconditional
    half under guidance) are ignored. `keep_probs` keeps the raw probabilities (for tests).
    """

    latent_hw: tuple[int, int]
    mask: torch.Tensor | None = None
    keep_probs: bool = False
    fs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> {"k","v"} -> (C, HW) sum over samples
    activation: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> {"k","v"} -> (C,) sum of mean |Fs|
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (h, w)
    probs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __call__(self, name, attn, query, key, value, probs, hw) -> None:
        if self.keep_probs:
            self.probs.setdefault(name, []).append(probs.cpu())
        if self.mask is None:
            return
        n = self.mask.shape[0]
        hw = hw or spatial_size(probs.shape[1], self.latent_hw)
        self.shapes[name] = hw
        rows = n * attn.heads
        fs_k, fs_v = neuron_contributions(query[:rows], key[:rows], value[:rows], probs[:rows], self.mask, attn.heads, attn.scale)
        for proj, fs in (("k", fs_k), ("v", fs_v)):
            s = self.fs.setdefault(name, {}).setdefault(proj, torch.zeros(fs.shape[2], fs.shape[1], device=fs.device))
            s += fs.sum(0).T
            a = self.activation.setdefault(name, {}).setdefault(proj, torch.zeros(fs.shape[2], device=fs.device))
            a += fs.abs().mean(1).sum(0)

    def reset(self) -> None:
        self.fs.clear()
        self.activation.clear()
        self.probs.clear()
