"""Image encoders: unit rows, batched, differentiable; CLIP and DINOv2 from local folders, offline."""

from __future__ import annotations

import pytest
import torch

from conceptkit.errors import ModelNotFoundError, UsageError
from conceptkit.features import (
    ClipEncoder,
    Dinov2Encoder,
    PixelEncoder,
    load_encoder,
    resolve_spec,
)


def _images(n=5, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check(enc, dim):
    x = _images().requires_grad_(True)
    e = enc(x)
    assert e.shape == (5, dim)
    assert torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-5)
    e[:, 0].sum().backward()  # differentiable: the slider loss backpropagates through it
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in enc.parameters())  # frozen
    one = enc.embed(x.detach()[:1])
    assert torch.allclose(one[0], enc.embed(x.detach(), batch_size=2)[0], atol=1e-5)  # batching changes nothing


def test_pixel_encoder_is_unit_differentiable_and_sees_images():
    enc = load_encoder("pixel:4")
    assert isinstance(enc, PixelEncoder) and enc.dim == 48
    _check(enc, 48)
    a, b = _images(1, seed=1), _images(1, seed=2)
    assert not torch.allclose(enc(a), enc(b))


@pytest.fixture
def clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from conceptkit.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(["red", "blue", "circle", "square", "a", "shape"], max_length=8)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, projection_dim=12,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8, projection_dim=12),
        projection_dim=12)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_clip_from_a_folder_embeds_images_and_text(clip_folder):
    enc = load_encoder(f"clip:{clip_folder}")
    assert isinstance(enc, ClipEncoder) and enc.dim == 12 and enc.has_text()
    _check(enc, 12)
    t = enc.embed_text(["a red shape", "a blue shape"])
    assert t.shape == (2, 12) and not torch.allclose(t[0], t[1])


def test_clip_vision_only_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8, projection_dim=10)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "v")
    enc = load_encoder(f"clip:{tmp_path / 'v'}")
    assert enc.dim == 10 and not enc.has_text()
    _check(enc, 10)
    with pytest.raises(UsageError):
        enc.embed_text(["red"])


def test_dinov2_from_a_folder_uses_the_cls_token(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=16, patch_size=8)
    model = Dinov2Model(cfg).eval()
    model.save_pretrained(tmp_path / "dino")
    enc = load_encoder(f"dinov2:{tmp_path / 'dino'}")
    assert isinstance(enc, Dinov2Encoder) and enc.dim == 16
    _check(enc, 16)
    x = torch.rand(2, 3, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    cls = model(pixel_values=(x - mean) / std).last_hidden_state[:, 0]
    assert torch.allclose(enc(x), torch.nn.functional.normalize(cls, dim=-1), atol=1e-5)


@pytest.mark.parametrize("spec, model, expected", [
    ("auto", "toy", "toy"), ("auto", "tiny-sd", "pixel"), ("auto", "tiny-sdxl", "pixel"),
    ("auto", "some/model", "clip:openai/clip-vit-large-patch14"), ("pixel:4", "toy", "pixel:4"),
])
def test_auto_picks_the_models_natural_encoder(spec, model, expected):
    assert resolve_spec(spec, model) == expected


@pytest.mark.parametrize("spec, error", [
    ("nonsense", UsageError), ("clip:", UsageError), ("pixel:x", UsageError), ("pixel:0", UsageError),
    ("clip:/no/such/folder", ModelNotFoundError), ("dinov2:nobody/not-cached-anywhere", ModelNotFoundError),
])
def test_bad_encoder_specs_fail_clearly(spec, error):
    with pytest.raises(error):
        load_encoder(spec)
