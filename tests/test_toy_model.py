"""The shipped toy model: loads offline with plain diffusers, samples fast, stays small; slow quality bars."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptkit.toy import FACTORS, SAMPLING_DEFAULTS, clip_path, image_embeds, load_clip, text_embeds, vocabulary, weights_path
from conceptkit.toy.checkpoint import flatten_optimizer, load_latest, restore_optimizer, save_checkpoint

WEIGHTS = weights_path()
needs_weights = pytest.mark.skipif(not (WEIGHTS / "model_index.json").exists(), reason="toy weights not trained yet")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(WEIGHTS)
    p.set_progress_bar_config(disable=True)
    return p


@needs_weights
def _files(folder):
    """Every file below `folder`, following links: a wheel holds copies where the repository holds links."""
    return [Path(root) / f for root, _, names in os.walk(folder, followlinks=True) for f in names]


def test_weights_are_small_and_safetensors_only():
    files = _files(WEIGHTS)
    teacher = [p for p in files if "turbo" not in p.relative_to(WEIGHTS).parts]
    assert sum(p.stat().st_size for p in teacher) <= 25 * 2**20
    # toy-turbo shares the teacher's VAE and text tower (links here, copies in a wheel): at most 15 MB more
    assert sum(p.stat().st_size for p in _files(WEIGHTS / "turbo")) <= 15 * 2**20
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]


@needs_weights
def test_plain_diffusers_load_and_sample(pipe):
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the latent std, not SD's constant
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    out = pipe(["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=SAMPLING_DEFAULTS["guidance"],
               generator=gen, output_type="np").images
    assert time.perf_counter() - t0 < 10
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()
    again = pipe(["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=SAMPLING_DEFAULTS["guidance"],
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.allclose(out, again, atol=1e-5)


@needs_weights
def test_tokenizer_words_are_single_tokens(pipe):
    tok = pipe.tokenizer
    assert tok.model_max_length == pipe.text_encoder.config.max_position_embeddings
    for word in vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


@needs_weights
def test_toy_clip_loads_and_embeds():
    clip, tok = load_clip()
    assert clip_path() == WEIGHTS / "clip"
    ids = tok(["a red shape", "a blue shape"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        t = text_embeds(clip, ids)
        i = image_embeds(clip, torch.zeros(3, 3, 32, 32))
    assert t.shape[0] == 2 and i.shape == (3, t.shape[1])
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_checkpoint_round_trip_resumes_optimizer_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    tensors, groups = flatten_optimizer(opt)
    save_checkpoint(tmp_path, 3, {**{f"model/{k}": v for k, v in model.state_dict().items()}, **tensors}, {"param_groups": groups})
    assert not list(tmp_path.rglob("*.bin")) and (tmp_path / "latest.json").exists()
    ck = load_latest(tmp_path)
    model2 = torch.nn.Linear(4, 3)
    model2.load_state_dict({k[6:]: v for k, v in ck.tensors.items() if k.startswith("model/")})
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    restore_optimizer(opt2, ck.tensors, ck.state["param_groups"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    assert ck.state["step"] == 3
    assert torch.equal(model.weight, model2.weight)


@pytest.mark.slow
@needs_weights
def test_quality_bars():
    from conceptkit.toy.quality import BARS, QualityConfig, measure

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    d = SAMPLING_DEFAULTS
    report = measure(QualityConfig(prompts=200, diversity_images=200, steps=d["steps"], guidance=d["guidance"]))
    assert min(report.fidelity.values()) >= BARS["fidelity"], report.fidelity
    assert min(report.diversity["colour"], report.diversity["shape"]) >= BARS["diversity"], report.diversity
    assert min(report.clip_zero_shot.values()) >= BARS["clip_zero_shot"], report.clip_zero_shot
    assert set(report.fidelity) == set(FACTORS)


def test_unet_training_resumes_exactly(tmp_path):
    """Two steps, a restart, two more steps == four uninterrupted steps (weights, EMA and export)."""
    from diffusers import StableDiffusionPipeline

    from conceptkit.toy.model import ToyArchitecture, build_clip, build_tokenizer, build_vae
    from conceptkit.toy.train import export_clip
    from conceptkit.toy.train_unet import UnetTrainConfig, train_unet

    torch.manual_seed(0)
    arch = ToyArchitecture()
    tok = build_tokenizer()
    for run in ("a", "b"):
        export_clip(build_clip(arch, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id).eval(), tok,
                    tmp_path / run / "export" / "clip")
    torch.manual_seed(0)
    vae = build_vae(arch)
    vae.register_to_config(scaling_factor=0.5)
    for run in ("a", "b"):
        vae.save_pretrained(tmp_path / run / "export" / "vae")
    # identical frozen parts in both runs: copy run a's CLIP over run b's
    import shutil

    shutil.rmtree(tmp_path / "b" / "export" / "clip")
    shutil.copytree(tmp_path / "a" / "export" / "clip", tmp_path / "b" / "export" / "clip")
    cfg = dict(batch=4, pool=64, checkpoint_every_s=1e9)
    whole = train_unet(UnetTrainConfig(steps=4, **cfg), arch, tmp_path / "a", tmp_path / "a" / "weights", log=lambda m: None)
    train_unet(UnetTrainConfig(steps=2, **cfg), arch, tmp_path / "b", tmp_path / "b" / "weights", log=lambda m: None)
    resumed = train_unet(UnetTrainConfig(steps=4, **cfg), arch, tmp_path / "b", tmp_path / "b" / "weights", log=lambda m: None)
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert load_latest(tmp_path / "b" / "unet").state["step"] == 4
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "b" / "weights")
    assert (tmp_path / "b" / "weights" / "clip" / "config.json").exists() and pipe.unet.config.sample_size == 8
