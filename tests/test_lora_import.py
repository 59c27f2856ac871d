"""`generate --lora FILE[:SCALE]`: other people's kohya LoRA files give diffusers' own images, next to our sliders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from conceptkit.cli import app
from conceptkit.diffusion import sample
from conceptkit.infotext import parse_infotext
from conceptkit.sliders.lora_import import LoraModification, inspect_lora, parse_lora
from _cli import one_line_error

runner = CliRunner()
PROMPT = "a shape"


KOHYA_SPECIAL = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's sgm names


def kohya_file(unet, path, *, rank=2, alpha=1.0, seed=0, std=0.5, suffixes=("attn1.to_q", "attn2.to_k", "attn2.to_v", "proj_in", "ff.net.2")):
    """A kohya-layout LoRA written from kohya's naming rules: `lora_unet_` + the diffusers module path with
    '.' -> '_' (SDXL's added-conditioning MLP by its sgm name `label_emb`), then `.lora_down.weight` (r, in[, 1, 1]), `.lora_up.weight` (out, r[, 1, 1]) and `.alpha` ()."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if not name.endswith(suffixes):
            continue
        key = "lora_unet_" + KOHYA_SPECIAL.get(name, name).replace(".", "_")
        conv = isinstance(module, torch.nn.Conv2d)
        n_in, n_out = (module.in_channels, module.out_channels) if conv else (module.in_features, module.out_features)
        tail = (1, 1) if conv else ()
        out[f"{key}.lora_down.weight"] = torch.randn(rank, n_in, *tail, generator=g) * std
        out[f"{key}.lora_up.weight"] = torch.randn(n_out, rank, *tail, generator=g) * std
        out[f"{key}.alpha"] = torch.tensor(alpha)
    assert out
    save_file(out, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.fixture(scope="module")
def model():
    from conceptkit.models.load import load_model

    return load_model("tiny-sd", device="cpu")


@pytest.fixture(scope="module")
def lora(model, tmp_path_factory):
    return kohya_file(model.pipe.unet, tmp_path_factory.mktemp("loras") / "bigger.safetensors")


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _plain_diffusers(model, path, scale, seeds) -> np.ndarray:
    """What a diffusers user gets: load_lora_weights + set_adapters, the same seeds, uint8 like our PNGs."""
    pipe = model.pipe
    pipe.load_lora_weights(str(path), adapter_name="plain")
    try:
        pipe.set_adapters(["plain"], [scale])
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = pipe(prompt=[PROMPT] * len(seeds), num_inference_steps=4, guidance_scale=7.5, generator=gens, output_type="pt").images
    finally:
        pipe.unload_lora_weights()
    return (out.float().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)


def _generate(tmp_path, *extra, seed=3, count=2):
    r = runner.invoke(app, ["generate", PROMPT, "-m", "tiny-sd", "--count", str(count), "--seed", str(seed),
                            "--out", str(tmp_path), "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_generate_lora_equals_plain_diffusers_and_zero_is_the_base(model, lora, tmp_path):
    doc = _generate(tmp_path / "lora", "--lora", f"{lora}:0.8")
    ours = np.stack([_png(f["path"]) for f in doc["files"]])
    assert np.array_equal(ours, _plain_diffusers(model, lora, 0.8, [3, 4]))
    base = np.stack([_png(f["path"]) for f in _generate(tmp_path / "base")["files"]])
    assert np.abs(ours.astype(int) - base).max() > 20  # the LoRA visibly changes the image
    zero = np.stack([_png(f["path"]) for f in _generate(tmp_path / "zero", "--lora", f"{lora}:0")["files"]])
    assert np.array_equal(zero, base)
    # the PNG names the file the way A1111 does, and our JSON chunk records its hash and strength
    info = parse_infotext(Image.open(doc["files"][0]["path"]).text["parameters"])
    assert info.loras == [("bigger", 0.8)] and info.params["Seed"] == "3"
    rec = json.loads(Image.open(doc["files"][0]["path"]).text["conceptkit"])["loras"][0]
    assert rec["layout"] == "kohya" and rec["scale"] == 0.8 and len(rec["sha256"]) == 64


def test_sdxl_lora_equals_plain_diffusers(tmp_path):
    from conceptkit.models.load import load_model

    xl = load_model("tiny-sdxl", device="cpu")
    path = kohya_file(xl.pipe.unet, tmp_path / "xl.safetensors", suffixes=("attn2.to_k", "attn2.to_v", "proj_in", "add_embedding.linear_1"))
    assert "add_embedding.linear_1" in inspect_lora(xl.pipe, parse_lora(str(path))).unet_modules
    r = runner.invoke(app, ["generate", PROMPT, "-m", "tiny-sdxl", "--count", "1", "--seed", "2", "--out", str(tmp_path / "o"),
                            "--json", "--lora", f"{path}:1.25"])
    assert r.exit_code == 0, r.output
    ours = _png(json.loads(r.stdout)["files"][0]["path"])[None]
    assert np.array_equal(ours, _plain_diffusers(xl, path, 1.25, [2]))
    base = (sample(xl, PROMPT, [2], 4, 7.5).permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    assert np.abs(ours.astype(int) - base).max() > 20


def test_lora_and_sliders_add_up_and_the_unet_is_left_as_found(model, lora):
    from conceptkit.sliders.bank import SliderLoraConfig, install_sliders

    names_before = [n for n, _ in model.pipe.unet.named_modules()]
    base = sample(model, PROMPT, [1, 2], 4, 7.5)
    checked = inspect_lora(model.pipe, parse_lora(str(lora)))
    mod = LoraModification(model.pipe, [checked], cfg_batches=True)
    bank = install_sliders(model.pipe.unet, SliderLoraConfig(1, seed=3, init_b_std=0.3))
    try:
        mod.set_weights({0: 0.0})
        assert torch.equal(sample(model, PROMPT, [1, 2], 4, 7.5, [mod]), base)  # strength 0 with a slider bank on: base
        mod.set_weights({0: 0.7})
        only_lora = sample(model, PROMPT, [1, 2], 4, 7.5, [mod])
        with bank.route_dense({0: 2.0}):
            both = sample(model, PROMPT, [1, 2], 4, 7.5, [mod])
            mod.set_weights({0: 0.0})
            only_slider = sample(model, PROMPT, [1, 2], 4, 7.5, [mod])
        mod.set_weights({0: 0.7})
        assert (only_lora - base).abs().max() > 1e-3 and (only_slider - base).abs().max() > 1e-3
        assert (both - only_lora).abs().max() > 1e-3 and (both - only_slider).abs().max() > 1e-3
        # per-image strengths (evaluate sliders' random combinations) equal the shared ones image by image
        mod.set_weights([{0: 0.7}, {}])
        mixed = sample(model, PROMPT, [1, 2], 4, 7.5, [mod])
        assert torch.allclose(mixed[0], only_lora[0], atol=1e-5) and torch.equal(mixed[1], base[1])
    finally:
        bank.remove()
        mod.remove()
    assert [n for n, _ in model.pipe.unet.named_modules()] == names_before  # peft layers gone
    assert torch.equal(sample(model, PROMPT, [1, 2], 4, 7.5), base)


def test_a_window_start_leaves_the_first_steps_alone(model, lora):
    checked = inspect_lora(model.pipe, parse_lora(str(lora)))
    base = sample(model, PROMPT, [1], 4, 7.5)
    images = {}
    for start in (0.0, 0.5, 1.0):
        mod = LoraModification(model.pipe, [checked], cfg_batches=True, start=start)
        try:
            mod.set_weights({0: 1.0})
            images[start] = sample(model, PROMPT, [1], 4, 7.5, [mod])
        finally:
            mod.remove()
    assert (images[0.5] - images[0.0]).abs().max() > 1e-3 and (images[0.5] - base).abs().max() > 1e-3
    # start 1.0 still acts on the last step (the window is at least one step), like our sliders
    assert (images[1.0] - base).abs().max() > 0 and (images[1.0] - base).abs().max() < (images[0.5] - base).abs().max()


@pytest.mark.parametrize("kind, fragment", [
    ("missing", "no such file"),
    ("pickle", "only .safetensors"),
    ("nan", "must be finite"),
    ("huge", "between -100 and 100"),
    ("word", "is not a number"),
    ("foreign", "matches no module"),
    ("shape", "a LoRA for another model"),
    ("not-lora", "no LoRA keys"),
    ("loha", "cannot convert"),
    ("nan-weights", "NaN or infinite"),
])
def test_bad_lora_files_are_one_line_exit_2(model, lora, tmp_path, kind, fragment):
    if kind == "missing":
        arg = str(tmp_path / "nope.safetensors")
    elif kind == "pickle":
        (tmp_path / "x.ckpt").write_bytes(b"not read")
        arg = str(tmp_path / "x.ckpt")
    elif kind == "nan":
        arg = f"{lora}:nan"
    elif kind == "huge":
        arg = f"{lora}:1e30"
    elif kind == "word":
        arg = f"{lora}:strong"
    elif kind == "foreign":  # a module this UNet does not have
        arg = str(tmp_path / "foreign.safetensors")
        save_file({"lora_unet_foo_bar_attn2_to_k.lora_down.weight": torch.zeros(2, 32),
                   "lora_unet_foo_bar_attn2_to_k.lora_up.weight": torch.zeros(32, 2),
                   "lora_unet_foo_bar_attn2_to_k.alpha": torch.tensor(1.0)}, arg)
    elif kind == "shape":  # the right names, another model's widths
        name = next(n for n, _ in model.pipe.unet.named_modules() if n.endswith("attn2.to_k"))
        key = "lora_unet_" + name.replace(".", "_")
        arg = str(tmp_path / "wide.safetensors")
        save_file({f"{key}.lora_down.weight": torch.zeros(2, 768), f"{key}.lora_up.weight": torch.zeros(320, 2),
                   f"{key}.alpha": torch.tensor(1.0)}, arg)
    elif kind == "nan-weights":
        arg = str(kohya_file(model.pipe.unet, tmp_path / "nan.safetensors", suffixes=("attn2.to_k",)))
        from safetensors.torch import load_file

        sd = load_file(arg)
        next(v for k, v in sd.items() if k.endswith("lora_up.weight"))[0, 0] = float("nan")
        save_file(sd, arg)
    elif kind == "loha":  # LyCORIS' Hadamard product factors: not a LoRA diffusers reads
        key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
        arg = str(tmp_path / "loha.safetensors")
        save_file({f"{key}.hada_w1_a": torch.zeros(32, 2), f"{key}.hada_w1_b": torch.zeros(2, 32),
                   f"{key}.hada_w2_a": torch.zeros(32, 2), f"{key}.hada_w2_b": torch.zeros(2, 32), f"{key}.alpha": torch.tensor(1.0)}, arg)
    else:
        arg = str(tmp_path / "weights.safetensors")
        save_file({"conv.weight": torch.zeros(2, 2)}, arg)
    r = runner.invoke(app, ["generate", PROMPT, "-m", "tiny-sd", "--count", "1", "--out", str(tmp_path / "o"), "--lora", arg])
    assert fragment in one_line_error(r)
    assert not (tmp_path / "o").exists()
