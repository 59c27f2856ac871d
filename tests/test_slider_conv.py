"""Sliders on Conv2d layers: the routed branch, training, and both file formats read back by diffusers."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from conceptkit.errors import UsageError
from conceptkit.sliders.bank import SliderLoraConfig, export_kohya, install_sliders, load_slider_file

# every conv of the UNet: 3x3 resnet convs, 1x1 shortcuts, stride-2 downsamplers, upsamplers, conv_in/out,
# and (SD 1.x) the 1x1 proj_in/proj_out of the transformers
CONV = r".*(conv1|conv2|conv_shortcut|downsamplers\.0\.conv|upsamplers\.0\.conv|conv_in|conv_out|proj_in|proj_out)"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _randomise(bank, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in zip(bank.lora_A, bank.lora_B):
            a.copy_(torch.randn(a.shape, generator=g) * a[0].numel() ** -0.5 * 2)
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)


def _inputs(pipe, n: int, seed: int = 1):
    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(seed)
    kw = {"sample": torch.randn(n, 4, 8, 8, generator=g), "timestep": torch.tensor([5, 700, 300, 999][:n]),
          "encoder_hidden_states": torch.randn(n, 8, cfg.cross_attention_dim, generator=g)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(n, pooled, generator=g), "time_ids": torch.randn(n, 6, generator=g)}
    return kw


def _run(unet, kw):
    with torch.no_grad():
        return unet(**kw).sample


def test_a_conv_slider_is_a_conv_down_projection_and_a_1x1_up_projection():
    """The branch of one conv target equals conv(x, A) then B, at the layer's stride and padding."""
    conv = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)
    net = torch.nn.Sequential(conv)
    bank = install_sliders(net, SliderLoraConfig(3, rank=2, alpha=3.0, target_modules="0"))
    _randomise(bank)
    x = torch.randn(4, 6, 9, 9)
    idx, s = torch.tensor([0, 2, 1, 2]), torch.tensor([1.0, -0.5, 2.0, 0.0])
    with torch.no_grad(), bank.route(idx, s):
        got = net(x)
    base = conv(x)
    for n in range(4):
        a, b = bank.lora_A[0][idx[n]], bank.lora_B[0][idx[n]]  # (2, 6, 3, 3), (5, 2)
        want = base[n] + 1.5 * s[n] * torch.einsum("or,rhw->ohw", b, torch.nn.functional.conv2d(x[n:n + 1], a, stride=2, padding=1)[0])
        torch.testing.assert_close(got[n], want, atol=1e-5, rtol=0)
    with torch.no_grad(), bank.route_dense({0: 1.0, 2: -0.5}):
        dense = net(x)
    with torch.no_grad(), bank.route(torch.zeros(4, dtype=torch.long), 1.0):
        only0 = net(x)
    with torch.no_grad(), bank.route(torch.full((4,), 2), -0.5):
        only2 = net(x)
    torch.testing.assert_close(dense, only0 + only2 - base, atol=1e-5, rtol=0)


def test_grouped_or_dilated_convs_are_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Conv2d(4, 4, 3, dilation=2))
    for name in ("0", "1"):
        with pytest.raises(ValueError, match="plain convolutions only"):
            install_sliders(net, SliderLoraConfig(1, target_modules=name))
    with pytest.raises(ValueError, match="nn.Linear and nn.Conv2d"):
        install_sliders(torch.nn.Sequential(torch.nn.GroupNorm(2, 4)), SliderLoraConfig(1, target_modules="0"))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_conv_sliders_round_trip_through_diffusers_in_both_formats(name, tmp_path):
    """Our file and the kohya export, each read by `pipe.load_lora_weights`, give our UNet output."""
    from conceptkit.models.tiny import build_tiny

    pipe = build_tiny(name)
    unet, plain = pipe.unet, copy.deepcopy(pipe.unet)
    targets = CONV + r"|.*attn2\.to_k"
    bank = install_sliders(unet, SliderLoraConfig(2, rank=2, alpha=3.0, target_modules=targets))
    kinds = {bank.specs[i].kind for i in range(len(bank.specs))}
    assert kinds == {"linear", "conv"} and any(s.kernel == (3, 3) and s.stride == (2, 2) for s in bank.specs)
    _randomise(bank)
    kw = _inputs(pipe, 2)
    with bank.route(torch.tensor([1, 1]), -1.3):
        ours = _run(unet, kw)
    base = _run(plain, kw)
    ours_file = bank.save_slider(1, tmp_path / "s.safetensors")
    with safe_open(str(ours_file), framework="pt") as f:
        a = f.get_tensor("unet.down_blocks.0.resnets.0.conv1.lora_A.weight")
        b = f.get_tensor("unet.down_blocks.0.resnets.0.conv1.lora_B.weight")
    assert a.shape == (2, 32, 3, 3) and b.shape == (32, 2, 1, 1)  # diffusers' / peft's conv LoRA layout
    kohya = export_kohya(ours_file, tmp_path / "k.safetensors", arch="sdxl" if name == "tiny-sdxl" else "sd1")
    with safe_open(str(kohya), framework="pt") as f:
        down = "lora_unet_input_blocks_1_0_in_layers_2" if name == "tiny-sdxl" else "lora_unet_down_blocks_0_resnets_0_conv1"
        assert f.get_tensor(f"{down}.lora_down.weight").shape == (2, 32, 3, 3)  # kohya LoCon layout
        assert f.get_tensor(f"{down}.lora_up.weight").shape == (32, 2, 1, 1)
    for k, path in enumerate((ours_file, kohya)):
        pipe.unet = plain
        pipe.load_lora_weights(str(path), adapter_name=f"f{k}")
        plain.set_adapters([f"f{k}"], [-1.3])
        theirs = _run(plain, kw)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
        plain.delete_adapters([f"f{k}"])
    assert (ours - base).abs().max() > 1e-2


def test_a_file_with_misshapen_conv_factors_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"unet.conv_in.lora_A.weight": torch.zeros(1, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.zeros(32, 1)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(UsageError, match="conv_in has lora_A"):
        load_slider_file(tmp_path / "bad.safetensors")


def test_training_moves_conv_sliders_on_tiny_sd(tmp_path, monkeypatch):
    """`sliders` with conv targets: the trained factors of the 3x3 convs move and land in the files."""
    from conceptkit.models.load import load_model
    from conceptkit.sliders.train import TrainSettings
    from conceptkit.sliders.pipeline import SlidersConfig, run

    monkeypatch.setenv("CONCEPTKIT_HOME", str(tmp_path))
    model = load_model("tiny-sd", device="cpu")
    targets = r".*resnets\.\d+\.(conv1|conv2)|.*attn2\.to_v|time_embedding\.linear_1"
    sset = run(model, SlidersConfig("a shape", count=2, samples=6, encoder="pixel", targets=targets,
                                    train=TrainSettings(steps=6, pairs=2, lr=1e-2)))
    loaded = load_slider_file(sset.path / sset.sliders[0].file)
    convs = [n for n, a in loaded.factors.lora_A.items() if a.ndim == 4]
    assert convs and all(".resnets." in n for n in convs)
    assert all(loaded.factors.lora_B[n].abs().max() > 0 for n in convs)  # B starts at zero: training moved it
    assert sset.manifest["loss"]["last"] is not None

    # the CLI export: kohya files for every slider and one warning line about what sd-scripts skips
    from typer.testing import CliRunner

    from conceptkit.cli import app

    result = CliRunner().invoke(app, ["sliders", "export", sset.name, str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "time_embedding.linear_1" in lines[0] and "sd-scripts" in lines[0]
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(files) == 2
    with safe_open(str(files[0]), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.title"].startswith(sset.name + "/")
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert "lora_unet_time_embedding_linear_1.alpha" in keys


@pytest.mark.parametrize(("targets", "why"), [(r".*attn2", "Attention"), (r"nothing\.here", "no module name matches")])
def test_targets_are_checked_before_the_harvest(targets, why, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from _cli import one_line_error
    from conceptkit.cli import app

    monkeypatch.setenv("CONCEPTKIT_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["sliders", "a shape", "--model", "tiny-sd", "--encoder", "pixel", "--targets", targets])
    line = one_line_error(result)
    assert "--targets" in line and why in line
    assert not any(tmp_path.rglob("*.safetensors"))  # no harvest ran


def test_random_baseline_keeps_each_conv_slider_norm():
    """`evaluate`'s random rank-1 control on conv factors (K, r, in, kh, kw): one norm per slider, as for linear ones."""
    from types import SimpleNamespace

    from conceptkit.evaluate.slider_draws import randomise

    bank = torch.nn.Module()
    bank.a = torch.nn.Parameter(torch.rand(3, 1, 8, 3, 3) * torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1, 1, 1))
    bank.b = torch.nn.Parameter(torch.rand(3, 16, 1))
    before = [torch.linalg.vector_norm(p.detach(), dim=tuple(range(1, p.ndim))) for p in bank.parameters()]
    old = [p.detach().clone() for p in bank.parameters()]
    randomise(SimpleNamespace(banks={"s": bank}), "s")
    for p, n, o in zip(bank.parameters(), before, old):
        after = torch.linalg.vector_norm(p.detach(), dim=tuple(range(1, p.ndim)))
        assert torch.allclose(after, n, rtol=0.5) and not torch.equal(p.detach(), o)
