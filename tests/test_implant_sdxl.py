"""`conceptkit implant --method temporal|xti` on SDXL (tiny-sdxl): both text towers get their own
vectors per timestep group or per cross-attention layer, the pooled embedding follows them, the
files load back in conceptkit's layout and the portable one, and a file for another model is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conceptkit.cli import app
from conceptkit.diffusion import conditioning, cross_attention_names, sample
from conceptkit.implant.pipeline import ImplantConfig, run
from conceptkit.implant.token import init_vectors
from conceptkit.models.load import load_model
from conceptkit.models.textual_inversion import add_embedding
from _cli import one_line_error

runner = CliRunner()


def _noise(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _widths(model) -> tuple[int, int]:
    pipe = model.pipe
    return pipe.text_encoder.get_input_embeddings().weight.shape[1], pipe.text_encoder_2.get_input_embeddings().weight.shape[1]


def _file(path: Path, vl: torch.Tensor, vg: torch.Tensor, **meta) -> Path:
    save_file({"vectors_l": vl.contiguous(), "vectors_g": vg.contiguous()}, str(path), metadata=meta)
    return path


def _portable(path: Path, vl: torch.Tensor, vg: torch.Tensor) -> Path:
    save_file({"clip_l": vl[None].contiguous(), "clip_g": vg[None].contiguous()}, str(path))
    return path


@pytest.mark.parametrize("method", [["--method", "temporal", "-D", "2"], ["--method", "xti"]], ids=["temporal", "xti"])
def test_temporal_and_xti_train_on_tiny_sdxl_and_generate_and_cluster_read_them(tmp_path, method):
    args = ["implant", str(_noise(tmp_path / "imgs")), "--model", "tiny-sdxl", "--token", "<noise>", "--init-word", "dog",
            "--train-steps", "4", *method, "--json"]
    doc = json.loads(runner.invoke(app, args).stdout)
    again = json.loads(runner.invoke(app, args).stdout)  # a rerun is a cache hit (read back from the SDXL layout)
    assert again["cached"] is True and again["embedding"] == doc["embedding"] and doc["cached"] is False
    own, portable = load_file(doc["embedding"]), load_file(doc["portable_embedding"])
    wl, wg = _widths(load_model("tiny-sdxl"))
    rows = 2 if "temporal" in method else len(cross_attention_names(load_model("tiny-sdxl").pipe.unet))
    assert sorted(own) == ["vectors_g", "vectors_l"] and own["vectors_l"].shape == (rows, wl) and own["vectors_g"].shape == (rows, wg)
    assert not torch.allclose(own["vectors_g"][0], own["vectors_g"][-1])  # the groups or layers learned apart
    # other tools get one vector per tower: the mean, in A1111's and ComfyUI's SDXL layout
    assert sorted(portable) == ["clip_g", "clip_l"]
    assert torch.allclose(portable["clip_l"][0], own["vectors_l"].mean(0), atol=1e-6)
    assert torch.allclose(portable["clip_g"][0], own["vectors_g"].mean(0), atol=1e-6)
    pipe = load_model("tiny-sdxl").pipe  # diffusers loads the portable file tower by tower, as for ti
    pipe.load_textual_inversion(portable["clip_l"][0], token="<noise>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(portable["clip_g"][0], token="<noise>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    row = pipe.text_encoder_2.get_input_embeddings().weight[pipe.tokenizer_2.convert_tokens_to_ids("<noise>")]
    assert torch.allclose(row.detach().float(), own["vectors_g"].mean(0), atol=1e-6)
    with safe_open(doc["embedding"], framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == method[1] and meta["base_model_arch"] == "sdxl"
    for path in (doc["embedding"], doc["portable_embedding"]):
        out = runner.invoke(app, ["generate", "a <noise>", "--model", "tiny-sdxl", "--embedding", path, "--token", "<noise>",
                                  "--count", "1", "--steps", "2", "--out", str(tmp_path / "gen"), "--json"])
        assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["cluster", "a <noise>", "--model", "tiny-sdxl", "--embedding", doc["embedding"], "--token", "<noise>",
                              "--samples", "2", "--steps", "4", "--k", "2", "--json"])
    assert out.exit_code == 0, out.output
    if "temporal" in method:
        assert json.loads(out.stdout)["temporal_dim"] == 2  # the word's own groups


def test_temporal_with_one_group_is_ti_on_sdxl(tmp_path):
    images = str(_noise(tmp_path / "imgs"))
    ti = run(load_model("tiny-sdxl"), ImplantConfig(images=images, token="<a>", init_word="dog", steps=4))
    d1 = run(load_model("tiny-sdxl"), ImplantConfig(images=images, token="<a>", init_word="dog", steps=4, method="temporal"))
    a, b = load_file(str(ti.embedding)), load_file(str(d1.path / d1.manifest["temporal_file"]))
    assert b["vectors_l"].shape[0] == 1
    assert torch.allclose(a["clip_l"][0], b["vectors_l"][0], atol=1e-6) and torch.allclose(a["clip_g"][0], b["vectors_g"][0], atol=1e-6)
    start = init_vectors(load_model("tiny-sdxl"), "dog")
    assert not torch.allclose(a["clip_l"][0], start[0]) and not torch.allclose(a["clip_g"][0], start[1])  # both towers learned


def _recorder(model):
    """Per UNet call: the timestep, every cross-attention layer's text states (what its keys are made
    from), and the pooled text embedding (the first columns of the added embedding's input)."""
    unet, calls = model.pipe.unet, []
    handles = [unet.register_forward_pre_hook(lambda _m, args, kwargs: calls.append({"t": int(args[1]), "layers": {}}) and None,
                                              with_kwargs=True)]

    def record(g):
        return lambda _m, args: calls[-1]["layers"].update({g: args[0].detach().clone()}) and None

    for g, name in enumerate(cross_attention_names(unet)):  # its keys' input: the states the layer attends to (called out of module order)
        handles.append(unet.get_submodule(name).to_k.register_forward_pre_hook(record(g)))
    handles.append(unet.add_embedding.register_forward_pre_hook(lambda _m, args: calls[-1].update(added=args[0].detach().clone()) and None))
    return calls, handles


def test_each_step_of_an_sdxl_word_in_time_uses_its_groups_vectors_in_both_towers_and_the_pooled_embedding(tmp_path):
    base = load_model("tiny-sdxl")
    wl, wg = _widths(base)
    g = torch.Generator().manual_seed(0)
    vl, vg = torch.randn(2, wl, generator=g), torch.randn(2, wg, generator=g)
    model = add_embedding(base, _file(tmp_path / "t.safetensors", vl, vg, method="temporal", temporal_dim="2"), "<w>")
    assert len(model.tokens_in_time) == 1
    calls, handles = _recorder(model)
    try:
        images = sample(model, "a <w>", [0], 4, 3.0)
    finally:
        for h in handles:
            h.remove()
    pooled_width = model.pipe.text_encoder_2.config.projection_dim
    used = set()
    for call in calls:
        want = conditioning(model, ["a <w>"], 0, 0, guidance=False, timestep=call["t"])
        assert torch.allclose(call["layers"][0][-1], want.cond[0], atol=1e-5)  # the prompt row, re-encoded for this step
        assert torch.allclose(call["added"][-1, :pooled_width], want.added_cond["text_embeds"][0], atol=1e-5)
        used.add(call["t"] * 2 // 1000)
    assert used == {0, 1}  # both groups were used along the way
    early = conditioning(model, ["a <w>"], 0, 0, guidance=False, timestep=900)
    late = conditioning(model, ["a <w>"], 0, 0, guidance=False, timestep=100)
    assert not torch.allclose(early.cond, late.cond) and not torch.allclose(early.added_cond["text_embeds"], late.added_cond["text_embeds"])
    # a generate with the temporal file differs from one with only its mean
    mean = add_embedding(load_model("tiny-sdxl"), _portable(tmp_path / "m.safetensors", vl.mean(0), vg.mean(0)), "<w>")
    assert (images - sample(mean, "a <w>", [0], 4, 3.0)).abs().max() > 1e-4


def test_each_cross_attention_layer_of_an_sdxl_xti_word_sees_its_own_vectors_and_the_pooled_one_is_the_means(tmp_path):
    base = load_model("tiny-sdxl")
    wl, wg = _widths(base)
    layers = cross_attention_names(base.pipe.unet)
    g = torch.Generator().manual_seed(1)
    vl, vg = torch.randn(len(layers), wl, generator=g), torch.randn(len(layers), wg, generator=g)
    model = add_embedding(base, _file(tmp_path / "x.safetensors", vl, vg, method="xti", layers=json.dumps(layers)), "<w>")
    assert len(model.tokens_in_layers) == 1
    calls, handles = _recorder(model)
    try:
        images = sample(model, "a <w>", [0], 2, 3.0)
    finally:
        for h in handles:
            h.remove()
    mean = add_embedding(load_model("tiny-sdxl"), _portable(tmp_path / "m.safetensors", vl.mean(0), vg.mean(0)), "<w>")
    plain = conditioning(mean, ["a <w>"], 0, 0, guidance=False)
    pooled_width = model.pipe.text_encoder_2.config.projection_dim
    for k in (0, len(layers) - 1):  # a layer's states: the prompt encoded with that layer's vectors in both towers
        one = add_embedding(load_model("tiny-sdxl"), _portable(tmp_path / f"{k}.safetensors", vl[k], vg[k]), "<w>")
        assert torch.allclose(calls[0]["layers"][k][-1], conditioning(one, ["a <w>"], 0, 0, guidance=False).cond[0], atol=1e-5)
    assert not torch.allclose(calls[0]["layers"][0][-1], calls[0]["layers"][len(layers) - 1][-1])
    assert torch.allclose(calls[0]["added"][-1, :pooled_width], plain.added_cond["text_embeds"][0], atol=1e-5)
    assert (images - sample(mean, "a <w>", [0], 2, 3.0)).abs().max() > 1e-4


def test_an_sdxl_temporal_or_xti_file_for_another_model_is_refused_in_one_line(tmp_path):
    wl, wg = _widths(load_model("tiny-sdxl"))
    sdxl = _file(tmp_path / "t.safetensors", torch.zeros(2, wl), torch.zeros(2, wg), method="temporal", temporal_dim="2")
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"vectors": torch.zeros(2, load_model("tiny-sd").pipe.text_encoder.get_input_embeddings().weight.shape[1])}, str(sd1),
              metadata={"method": "temporal", "temporal_dim": "2"})
    other_unet = _file(tmp_path / "x.safetensors", torch.zeros(2, wl), torch.zeros(2, wg), method="xti", layers=json.dumps(["a.attn2", "b.attn2"]))
    wrong_d = _file(tmp_path / "d.safetensors", torch.zeros(3, wl), torch.zeros(3, wg), method="temporal", temporal_dim="2")
    cases = [("tiny-sd", sdxl, "SDXL model"), ("tiny-sdxl", sd1, "SD 1.x/2.x"), ("tiny-sdxl", other_unet, "another UNet"),
             ("tiny-sdxl", wrong_d, "temporal_dim")]
    for spec, path, fragment in cases:
        out = runner.invoke(app, ["generate", "a <w>", "--model", spec, "--embedding", str(path), "--token", "<w>", "--count", "1",
                                  "--steps", "2", "--out", str(tmp_path / "gen")])
        assert out.exit_code == 2 and fragment in one_line_error(out), (spec, path.name, out.output)
    assert not (tmp_path / "gen").exists()


def test_an_interrupted_sdxl_temporal_training_resumes_to_the_same_vectors(tmp_path, monkeypatch):
    from conceptkit.implant import train as implant_train
    from conceptkit.implant.token import LearnedToken

    monkeypatch.setattr(implant_train, "CHECKPOINT_EVERY", 2)
    model0 = load_model("tiny-sdxl")
    starts = [v.expand(2, -1).clone() for v in init_vectors(model0, "dog")]
    latents = torch.randn(2, model0.pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5

    def train(ckpt, progress=None):
        model = load_model("tiny-sdxl")
        words = [LearnedToken(model, "<n>", v, tower) for tower, v in enumerate(starts)]
        implant_train.train(model, words, latents, steps=5, lr=1e-2, batch_size=2, seed=0, templates=("a {}",),
                            checkpoint=ckpt, key="k", progress=progress)
        return [w.vector.detach().clone() for w in words]

    straight = train(tmp_path / "a.safetensors")

    def stop(done, total, **_):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b.safetensors", stop)
    resumed = train(tmp_path / "b.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight, strict=True))
    assert not torch.allclose(straight[1][0], starts[1][0])  # the second tower's vectors moved
