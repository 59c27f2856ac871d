"""SliderSpace on FLUX.1 and SD3: the batched bank trains on the transformers' attention, strength 0
is the base model bit for bit, the files load with diffusers' own pipelines, and the kohya FLUX export
lands every key on a weight of ComfyUI's FLUX key map."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conceptkit.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from _cli import one_line_error  # noqa: E402
from _clients import comfy_flux_key_map, comfy_load, fits, flux_bfl_weights  # noqa: E402

runner = CliRunner()
FLOW = ("tiny-flux", "tiny-sd3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{model name: (home, model, set)}: 2 sliders briefly trained on each tiny flow model, in its own store."""
    from conceptkit.models.load import load_model
    from conceptkit.sliders.pipeline import SlidersConfig, run
    from conceptkit.sliders.targets import default_targets
    from conceptkit.sliders.train import TrainSettings

    out = {}
    for name in FLOW:
        home = tmp_path_factory.mktemp("home")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CONCEPTKIT_HOME", str(home))
            model = load_model(name, device="cpu")
            cfg = SlidersConfig("a photo of a dog", count=2, samples=4, encoder="pixel",
                                targets=default_targets(model.arch), train=TrainSettings(steps=4, pairs=2, lr=5e-2))
            out[name] = (home, model, run(model, cfg))
    return out


@pytest.mark.parametrize("name", FLOW)
def test_sliders_sit_on_both_streams_and_train(trained, name):
    _, model, sset = trained[name]
    with safe_open(str(sset.path / sset.sliders[0].file), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert all(k.startswith("transformer.") for k in keys)
    modules = {k.removeprefix("transformer.").split(".lora_")[0] for k in keys}
    assert any(m.endswith("attn.add_k_proj") for m in modules) and any(m.endswith("attn.to_v") for m in modules)
    if name == "tiny-flux":
        assert any(m.startswith("single_transformer_blocks.") for m in modules)
    assert json.loads(meta["lora_adapter_metadata"])["transformer.r"] == 1
    assert sset.manifest["model"]["arch"] == model.arch and len(sset.sliders) == 2


@pytest.mark.parametrize("name", FLOW)
def test_strength_zero_is_the_base_model_and_strength_moves_it(trained, name):
    from conceptkit.diffusion import sample
    from conceptkit.models.flow import denoiser
    from conceptkit.sliders.apply import SliderModification

    _, model, sset = trained[name]
    chosen = [(sset, sset.sliders[0])]
    base = sample(model, "a photo of a dog", [0, 1], 3, model.default_guidance)
    mod = SliderModification(denoiser(model.pipe), chosen, cfg_batches=model.arch == "sd3")
    try:
        mod.set_weights({(sset.name, 0): 0.0})
        zero = sample(model, "a photo of a dog", [0, 1], 3, model.default_guidance, [mod])
        mod.set_weights({(sset.name, 0): 50.0})
        moved = sample(model, "a photo of a dog", [0, 1], 3, model.default_guidance, [mod])
    finally:
        mod.remove()
    assert torch.equal(zero, base)
    assert (moved - base).abs().max() > 1e-4


@pytest.mark.parametrize("name", FLOW)
def test_files_load_with_diffusers_pipelines_and_match_our_bank(trained, name):
    from conceptkit.models.flow import denoiser
    from conceptkit.sliders.bank import SliderLoraConfig, install_sliders

    _, model, sset = trained[name]
    net = denoiser(model.pipe)
    path = sset.path / sset.sliders[1].file
    g = torch.Generator().manual_seed(0)
    if name == "tiny-flux":
        x = torch.randn(1, 64, 16, generator=g)
        kw = dict(hidden_states=x, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  pooled_projections=torch.randn(1, 32, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  txt_ids=torch.zeros(8, 3), img_ids=torch.zeros(64, 3), return_dict=False)
    else:
        kw = dict(hidden_states=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 8, 64, generator=g), pooled_projections=torch.randn(1, 64, generator=g),
                  return_dict=False)
    st = sset.manifest["settings"]
    bank = install_sliders(net, SliderLoraConfig(1, rank=int(st["rank"]), alpha=float(st["alpha"]), target_modules=st["targets"]))
    try:
        bank.load_slider(0, path)
        with torch.no_grad(), bank.route_dense({0: 1.5}):
            ours = net(**kw)[0]
    finally:
        bank.remove()
    with torch.no_grad():
        base = net(**kw)[0]
    model.pipe.load_lora_weights(str(path), adapter_name="slider")  # FluxPipeline / StableDiffusion3Pipeline
    try:
        model.pipe.set_adapters(["slider"], [1.5])
        with torch.no_grad():
            theirs = net(**kw)[0]
    finally:
        model.pipe.delete_adapters(["slider"])
    assert (ours - base).abs().max() > 1e-6
    assert torch.allclose(ours, theirs, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(net(**kw)[0], base)


def test_kohya_flux_export_maps_every_key_under_comfyui(trained, tmp_path):
    from conceptkit.sliders.files import load_slider_file
    from conceptkit.sliders.kohya import export_kohya

    _, model, sset = trained["tiny-flux"]
    path = sset.path / sset.sliders[0].file
    out = export_kohya(path, tmp_path / "flux.safetensors")
    with safe_open(str(out), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    key_map = comfy_flux_key_map(model.pipe.transformer)
    patched, not_loaded = comfy_load({k: tuple(v.shape) for k, v in tensors.items()}, key_map)
    assert not_loaded == [] and patched
    assert all(p.startswith("lora_unet_") for p in patched)
    # each patch is exactly the slider on that layer's rows of the fused BFL weight, nothing elsewhere
    factors = load_slider_file(path).factors
    places = flux_bfl_weights(model.pipe.transformer)
    scale = factors.alpha / factors.rank
    for prefix, weight in patched.items():
        down, up = tensors[f"{prefix}.lora_down.weight"], tensors[f"{prefix}.lora_up.weight"]
        assert fits(tuple(down.shape), tuple(up.shape), weight.shape)
        delta = up @ down * (tensors[f"{prefix}.alpha"].item() / down.shape[0])
        expected = torch.zeros(weight.shape)
        for module, place in places.items():
            if place.weight.name == weight.name and module in factors.lora_A:
                expected[place.start:place.start + place.rows] = factors.lora_B[module] @ factors.lora_A[module] * scale
        assert torch.allclose(delta, expected, atol=1e-6)
    assert {places[m].weight.name for m in factors.lora_A} == {w.name for w in patched.values()}
    # the diffusers file itself loads in ComfyUI too: every `transformer.<module>.lora_A/B` key is in the same map
    with safe_open(str(path), framework="pt") as f:
        peft_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    patched, not_loaded = comfy_load(peft_shapes, key_map, peft=True)
    assert not_loaded == [] and len(patched) == len(factors.lora_A)


def test_generate_with_a_slider_and_the_lora_refusals(trained, tmp_path, monkeypatch):
    home, _, sset = trained["tiny-flux"]
    monkeypatch.setenv("CONCEPTKIT_HOME", str(home))
    result = runner.invoke(app, ["generate", "a photo of a dog", "-m", "tiny-flux", "--slider", f"{sset.name}/0=2", "-n", "1",
                                 "--steps", "2", "--device", "cpu", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"][0]["sliders"][0]["scale"] == 2
    # a FLUX slider set on SDXL, and a FLUX LoRA file on SDXL: one line each
    line = one_line_error(runner.invoke(app, ["generate", "a photo of a dog", "-m", "tiny-sdxl", "--slider", f"{sset.name}/0=2",
                                              "--device", "cpu", "--out", str(tmp_path)]))
    assert "flux" in line
    flux_file = sset.path / sset.sliders[0].file
    line = one_line_error(runner.invoke(app, ["generate", "a dog", "-m", "tiny-sdxl", "--lora", str(flux_file),
                                              "--device", "cpu", "--out", str(tmp_path)]))
    assert "FLUX / SD3 transformer" in line


def test_lora_files_on_flux_ours_and_the_kohya_export_draw_the_same(trained, tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from conceptkit.sliders.kohya import export_kohya

    _, _, sset = trained["tiny-flux"]
    # diffusers' kohya FLUX converter assumes FLUX.1's single-block widths (3072, 12288): at tiny width only the
    # double blocks can be read back through it, so both files keep those
    with safe_open(str(sset.path / sset.sliders[0].file), framework="pt") as f:
        meta = f.metadata()
        double = {k: f.get_tensor(k) for k in f.keys() if k.startswith("transformer.transformer_blocks.")}
    ours = tmp_path / "ours.safetensors"
    modules = sorted({k.removeprefix("transformer.").split(".lora_")[0] for k in double})
    cfg = {**json.loads(meta["lora_adapter_metadata"]), "transformer.target_modules": modules}
    conceptkit = {**json.loads(meta["conceptkit_slider"]), "modules": modules}
    save_file(double, str(ours), metadata={**meta, "lora_adapter_metadata": json.dumps(cfg),
                                           "conceptkit_slider": json.dumps(conceptkit)})
    kohya = export_kohya(ours, tmp_path / "kohya.safetensors")  # BFL names, fused qkv, through diffusers' kohya converter

    def draw(*extra):
        r = runner.invoke(app, ["generate", "a photo of a dog", "-m", "tiny-flux", "-n", "1", "--steps", "3", "--device", "cpu",
                                "--out", str(tmp_path / "img"), "--json", *extra])
        assert r.exit_code == 0, r.output
        return np.asarray(Image.open(json.loads(r.stdout)["files"][0]["path"]), dtype=np.int16)

    base, a, b = draw(), draw("--lora", f"{ours}:40"), draw("--lora", f"{kohya}:40")
    assert np.abs(a - base).max() > 0 and np.abs(a - b).max() <= 1  # the same weight change (PNG rounding)
    sd_lora = tmp_path / "sd.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(1, 32),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 1)}, str(sd_lora))
    line = one_line_error(runner.invoke(app, ["generate", "a dog", "-m", "tiny-flux", "--lora", str(sd_lora), "--device", "cpu",
                                              "--out", str(tmp_path)]))
    assert "SD / SDXL UNet" in line


def test_an_sd3_lora_file_applies_with_generate(trained, tmp_path):
    _, _, sset = trained["tiny-sd3"]
    runs = [runner.invoke(app, ["generate", "a photo of a dog", "-m", "tiny-sd3", "-n", "1", "--steps", "2", "--device", "cpu",
                                "--out", str(tmp_path / name), "--json", *extra])
            for name, extra in (("base", ()), ("lora", ("--lora", f"{sset.path / sset.sliders[0].file}:40")))]
    assert all(r.exit_code == 0 for r in runs), runs[-1].output
    import numpy as np
    from PIL import Image

    base, lora = (np.asarray(Image.open(json.loads(r.stdout)["files"][0]["path"]), dtype=np.int16) for r in runs)
    assert np.abs(lora - base).max() > 0  # pixels, not the PNG's settings text


def test_sliders_train_on_the_command_line_with_auto_targets_and_export(tmp_path):
    result = runner.invoke(app, ["sliders", "train", "a photo of a dog", "-m", "tiny-flux", "--count", "2", "--samples", "3",
                                 "--train-steps", "2", "--device", "cpu", "--export", str(tmp_path / "kohya"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    manifest = json.loads((Path(doc["path"]) / "manifest.json").read_text())
    assert manifest["settings"]["targets"].startswith("(transformer_blocks|single_transformer_blocks)")
    assert len(doc["export"]) == 2 and all(Path(p).is_file() for p in doc["export"])
    line = one_line_error(runner.invoke(app, ["sliders", "train", "a photo of a dog", "-m", "tiny-sd3", "--export",
                                              str(tmp_path / "k3"), "--device", "cpu"]))
    assert "SD3 has no kohya naming" in line
