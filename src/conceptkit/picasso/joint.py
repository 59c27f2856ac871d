"""Concept neurons in joint attention (FLUX.1's double blocks, SD3's joint blocks).

An MMDiT block has no cross-attention: text and image tokens attend together in one softmax, but
the text tokens keep their own key and value projections, `attn.add_k_proj` and `attn.add_v_proj`.
They play the role of a UNet cross-attention's `to_k` / `to_v` (Cones' and Picasso's concept
neurons): a *neuron* here is one output channel of `add_k_proj` or `add_v_proj`. Its spatial map
Fs uses the image-query-to-text-key attention only, the rows of image queries and the columns of
the concept's text tokens of the joint softmax (whose denominator runs over text and image keys):

    Fs_v[p, c] = sum_s P[p, s] m[s] V_txt[s, c],   Fs_k[p, c] = sum_s P[p, s] m[s] scale q[p, c] K_txt[s, c]

with q the image query after its RMS norm and rotary embedding (FLUX), K_txt the text key after
its norm (and rotary embedding: FLUX's text positions are 0, a rotation by nothing). The key
share is channel c's term of the logit q . k; the per-head RMS norm couples a head's channels, so
closing one neuron changes its neighbours' normalised keys a little as well. FLUX's single blocks
(one stream, no text projections of their own) hold no concept neurons by this definition.

`capture_joint` recomputes these quantities in a forward hook beside the model's own attention
(which stays as it is, SDPA included): the image is bit-identical with and without capture.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from conceptkit.diffusion_flow import FlowConditioning, is_packed, velocity
from conceptkit.models.flow import pipeline_kwargs


def joint_attention_names(net) -> list[str]:
    """Module names of a transformer's joint attentions (those with text projections), in module order."""
    return [name for name, m in net.named_modules() if name.endswith(".attn") and getattr(m, "add_k_proj", None) is not None]


def concept_layers(net) -> tuple[list[str], list[torch.nn.Linear]]:
    """(joint attention names, their add_k_proj and add_v_proj in order: layer 0 k, layer 0 v, ...)."""
    names = joint_attention_names(net)
    return names, [m for n in names for m in (net.get_submodule(n).add_k_proj, net.get_submodule(n).add_v_proj)]


def _recorder(name: str, sink):
    def hook(attn, args, kwargs, _output):
        x = kwargs.get("hidden_states", args[0] if args else None)
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        rope = kwargs.get("image_rotary_emb")
        if enc is None:
            return None
        with torch.no_grad():
            heads = attn.heads
            dh = attn.to_q.out_features // heads
            b, hw, length = x.shape[0], x.shape[1], enc.shape[1]

            def split(t):  # (B, S, heads*dh) -> (B, S, heads, dh)
                return t.unflatten(-1, (heads, dh))

            def norm(layer, t):
                return t if layer is None else layer(t)

            q = norm(getattr(attn, "norm_q", None), split(attn.to_q(x)))
            k = norm(getattr(attn, "norm_k", None), split(attn.to_k(x)))
            kt = norm(getattr(attn, "norm_added_k", None), split(attn.add_k_proj(enc)))
            vt = split(attn.add_v_proj(enc))
            if rope is not None:  # FLUX: rotary positions over [text; image]
                from diffusers.models.embeddings import apply_rotary_emb  # deferred: diffusers' helper, loaded with the model

                q = apply_rotary_emb(torch.cat([torch.zeros_like(kt), q], 1), rope, sequence_dim=1)[:, length:]
                both = apply_rotary_emb(torch.cat([kt, k], 1), rope, sequence_dim=1)
                kt, k = both[:, :length], both[:, length:]
            scale = dh ** -0.5
            q, k, kt, vt = (t.transpose(1, 2).float() for t in (q, k, kt, vt))  # (B, heads, S, dh)
            keys = torch.cat([kt, k], 2)
            # image queries on the text keys, normalised over all keys; a head at a time, keeping the text columns
            # only (FLUX.1 at 1024 px: 4096 x 4608 logits per head instead of 24 times that)
            probs = torch.stack([(torch.einsum("bpd,bsd->bps", q[:, h], keys[:, h]) * scale).softmax(-1)[..., :length]
                                 for h in range(heads)], 1)  # (B, heads, HW, L)
            flat = [t.reshape(b * heads, t.shape[2], dh) for t in (q, kt, vt)]
            sink(name, SimpleNamespace(heads=heads, scale=scale), *flat, probs.reshape(b * heads, hw, length), None)
        return None

    return hook


@contextmanager
def capture_joint(net, sink) -> Iterator[list[str]]:
    """Record every joint attention of `net` into `sink` (as `attention.capture` does for a UNet); yields the names."""
    names = joint_attention_names(net)
    handles = [net.get_submodule(n).register_forward_hook(_recorder(n, sink), with_kwargs=True) for n in names]
    try:
        yield names
    finally:
        for h in handles:
            h.remove()


def concept_mask(model, prompts: Sequence[str], concept: str | None, word_mask) -> tuple[torch.Tensor, list[list[str]]]:
    """Which positions of the joint text sequence are the concept: FLUX's T5 tokens; SD3's 77 CLIP tokens then its T5 tokens.

    Args:
        word_mask: `neurons.concept_mask(tokenizer, prompts, concept, max_length)`, applied per tokenizer.
    """
    pipe = model.pipe
    flux = is_packed(pipe)
    t5 = pipe.tokenizer_2 if flux else pipe.tokenizer_3
    length = pipeline_kwargs(pipe).get("max_sequence_length", 512 if flux else 256)
    mask_t5, picked_t5 = word_mask(t5, prompts, concept, length)
    if flux:
        return mask_t5, picked_t5
    mask_clip, picked_clip = word_mask(pipe.tokenizer, prompts, concept, pipe.tokenizer.model_max_length)
    return torch.cat([mask_clip, mask_t5], 1), [a + b for a, b in zip(picked_clip, picked_t5)]


def rows(cond: FlowConditioning, idx) -> FlowConditioning:
    """The conditioning of rows `idx` (a slice or an index tensor)."""
    pick = (lambda t: None if t is None else t[idx])
    return FlowConditioning(pick(cond.cond), pick(cond.pooled), pick(cond.uncond), pick(cond.pooled_uncond), cond.text_ids)


def denoising_loss_terms(model, x0: torch.Tensor, eps: torch.Tensor, t: int, cond: FlowConditioning):
    """(velocity, target) at x_t = (1 - sigma) x0 + sigma eps, sigma = t / 1000: rectified flow's loss (Esser et al. 2024, Eq. 1).

    FLUX takes its embedded guidance at the model's default scale; SD3 the conditional branch alone (no CFG),
    as a UNet's loss is taken on the prompt's branch.
    """
    sigma = torch.full((len(x0),), float(t) / float(model.pipe.scheduler.config.num_train_timesteps), device=x0.device)
    s = sigma.view(-1, 1, 1, 1).to(x0.dtype)
    xt = (1 - s) * x0 + s * eps
    v = velocity(model, xt, sigma, cond, torch.arange(len(x0), device=x0.device), model.default_guidance)
    return v, eps - x0
