"""Cross-attention capture: recorded probabilities are the model's, capture leaves the image alone,
and the per-neuron contributions Fs add up to what the layer computes."""

from __future__ import annotations

import pytest
import torch

from conceptkit.picasso.attention import (
    ConceptSink,
    capture,
    cross_attention_names,
    neuron_contributions,
    spatial_size,
)
from conceptkit.models.load import load_model


@pytest.fixture(scope="module")
def tiny_sd():
    return load_model("tiny-sd")


@pytest.fixture(scope="module")
def tiny_sdxl():
    return load_model("tiny-sdxl")


def _unet_inputs(model, batch=2):
    pipe = model.pipe
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, 16, 16, generator=g)
    out = pipe.encode_prompt(prompt=["a red circle"] * batch, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    kwargs = {"encoder_hidden_states": out[0]}
    if model.arch == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": out[2], "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * batch, dtype=torch.float32)}
    return latents, kwargs


def _layer_inputs(unet, name, latents, kwargs):
    """Run the UNet with the default processors and keep the inputs of one attn2 layer and its to_out input."""
    seen = {}
    mod = unet.get_submodule(name)
    h1 = mod.register_forward_pre_hook(lambda m, a, kw: seen.update(hs=kw.get("hidden_states", a[0] if a else None), ehs=kw["encoder_hidden_states"]), with_kwargs=True)
    h2 = mod.to_out[0].register_forward_pre_hook(lambda m, a: seen.update(out_in=a[0]))
    try:
        with torch.no_grad():
            unet(latents, 500, **kwargs)
    finally:
        h1.remove()
        h2.remove()
    return seen


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sdxl"])
def test_captured_probabilities_match_a_manual_softmax(which, request):
    model = request.getfixturevalue(which)
    unet = model.pipe.unet
    latents, kwargs = _unet_inputs(model)
    name = cross_attention_names(unet)[-1]
    seen = _layer_inputs(unet, name, latents, kwargs)
    sink = ConceptSink(latent_hw=(16, 16), keep_probs=True)
    with torch.no_grad(), capture(unet, sink) as names:
        unet(latents, 500, **kwargs)
    assert names == cross_attention_names(unet) and set(sink.probs) == set(names)
    attn = unet.get_submodule(name)
    q = attn.to_q(seen["hs"])
    k = attn.to_k(seen["ehs"])
    b, n, c = q.shape
    heads = attn.heads
    qh = q.view(b, n, heads, c // heads).transpose(1, 2)
    kh = k.view(b, -1, heads, c // heads).transpose(1, 2)
    manual = torch.softmax(qh @ kh.transpose(-1, -2) * (c // heads) ** -0.5, dim=-1).reshape(b * heads, n, -1)
    recorded = sink.probs[name][0]
    assert recorded.shape == manual.shape
    assert torch.allclose(recorded, manual, atol=1e-6)


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sdxl"])
def test_capture_changes_the_image_by_less_than_1e_5_and_restores_processors(which, request):
    model = request.getfixturevalue(which)
    pipe = model.pipe
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}

    def image():
        return pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(1), output_type="pt").images

    with torch.no_grad():
        plain = image()
        sink = ConceptSink(latent_hw=(16, 16), keep_probs=True)
        with capture(pipe.unet, sink):
            captured = image()
    assert sink.probs  # the capture did run
    assert (plain - captured).abs().max().item() < 1e-5
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before


def test_value_and_key_contributions_add_up_to_the_layer(tiny_sd):
    """Fs_v over all tokens is the attention output before to_out; Fs_k summed over a head's channels
    is the probability-weighted logit over the concept tokens."""
    unet = tiny_sd.pipe.unet
    latents, kwargs = _unet_inputs(tiny_sd)
    name = cross_attention_names(unet)[0]
    seen = _layer_inputs(unet, name, latents, kwargs)
    attn = unet.get_submodule(name)
    with torch.no_grad():
        q = attn.head_to_batch_dim(attn.to_q(seen["hs"]))
        k = attn.head_to_batch_dim(attn.to_k(seen["ehs"]))
        v = attn.head_to_batch_dim(attn.to_v(seen["ehs"]))
        probs = attn.get_attention_scores(q, k)
    length = k.shape[1]
    all_tokens = torch.ones(2, length)
    _, fs_v = neuron_contributions(q, k, v, probs, all_tokens, attn.heads, attn.scale)
    assert torch.allclose(fs_v, seen["out_in"], atol=1e-6)
    # only tokens 1 and 2: the key contributions of one head sum to sum_s P * logit over those tokens
    mask = torch.zeros(2, length)
    mask[:, 1:3] = 1
    fs_k, fs_v2 = neuron_contributions(q, k, v, probs, mask, attn.heads, attn.scale)
    heads, dh = attn.heads, q.shape[-1]
    logits = (q @ k.transpose(-1, -2)) * attn.scale  # (B*heads, HW, L)
    expect_k = (probs[..., 1:3] * logits[..., 1:3]).sum(-1).view(2, heads, -1).transpose(1, 2)  # (B, HW, heads)
    got_k = fs_k.view(2, -1, heads, dh).sum(-1)
    assert torch.allclose(got_k, expect_k, atol=1e-5)
    expect_v = torch.bmm(probs[..., 1:3], v[:, 1:3]).view(2, heads, -1, dh).permute(0, 2, 1, 3).reshape(2, -1, heads * dh)
    assert torch.allclose(fs_v2, expect_v, atol=1e-6)
    # and a mask that picks nothing contributes nothing
    zero_k, zero_v = neuron_contributions(q, k, v, probs, torch.zeros(2, length), heads, attn.scale)
    assert zero_k.abs().max() == 0 and zero_v.abs().max() == 0


def test_spatial_size_follows_the_unet_downsampling():
    assert spatial_size(64, (16, 16)) == (8, 8)
    assert spatial_size(256, (16, 16)) == (16, 16)
    assert spatial_size(4 * 5, (15, 19)) == (4, 5)
    with pytest.raises(ValueError):
        spatial_size(7, (16, 16))
