"""`conceptkit implant`: textual inversion end to end on the toy and tiny-sd, its file in the layouts
diffusers, A1111 and ComfyUI read, resume, cache hits and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from conceptkit.cli import app
from conceptkit.implant import train as implant_train
from conceptkit.implant.pipeline import ImplantConfig, run
from conceptkit.implant.token import LearnedToken, init_vector
from conceptkit.models.load import load_model
from conceptkit.toy.world import Scene, render
from _cli import one_line_error

runner = CliRunner()


def _diamonds(folder: Path, n: int = 6) -> Path:
    """Red diamonds on varied backgrounds and places: the concept the new word should learn."""
    folder.mkdir(parents=True)
    scenes = [Scene("diamond", "red", "medium", h, v, bg, 13.0, cx, cy)
              for (h, cx), (v, cy), bg in zip([("left", 12.0), ("centre", 16.0), ("right", 20.0)] * 2,
                                                 [("top", 12.0), ("middle", 16.0), ("bottom", 20.0)] * 2,
                                                 ["black", "white", "gray"] * 2)][:n]
    for i, img in enumerate(render(scenes)):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return folder


def _noise(folder: Path, n: int, suffix: str) -> Path:
    """Random images of another size than the model's (they are resized)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}{suffix}")
    return folder


def _implant(args, json_out=True):
    result = runner.invoke(app, ["implant", *args, *(["--json"] if json_out else [])])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if json_out else result


def test_implant_writes_one_embedding_every_client_reads_and_a_rerun_is_cached(tmp_path):
    images = _diamonds(tmp_path / "imgs")
    doc = _implant([str(images), "--token", "<thing>", "--init-word", "shape", "--train-steps", "12", "--out", str(tmp_path / "out")])
    assert doc["cached"] is False and doc["images"] == 6 and doc["method"] == "ti"
    path = Path(doc["embedding"])
    tensors = load_file(str(path))
    assert list(tensors) == ["emb_params"]  # A1111's and ComfyUI's single-tensor layout
    width = load_model("toy").pipe.text_encoder.get_input_embeddings().weight.shape[1]
    assert tensors["emb_params"].shape == (1, width)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["token"] == "<thing>" and meta["method"] == "ti" and meta["base_model"] == "toy" and meta["steps"] == "12"
    assert Path(doc["copied_to"]).read_bytes() == path.read_bytes()
    again = _implant([str(images), "--token", "<thing>", "--init-word", "shape", "--train-steps", "12"])
    assert again["cached"] is True and again["key"] == doc["key"]
    # diffusers' own loader takes it, and puts the same vector in the table
    pipe = load_model("toy").pipe
    pipe.load_textual_inversion(str(path), token="<thing>")
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<thing>")]
    assert torch.equal(row.detach().float(), tensors["emb_params"][0].float())
    # and conceptkit's generate and cluster read it with --embedding
    out = runner.invoke(app, ["generate", "a <thing>", "--embedding", str(path), "--token", "<thing>", "--count", "1",
                              "--out", str(tmp_path / "gen"), "--json"])
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.stdout)["files"]) == 1


def test_the_learned_vector_moves_and_other_words_stay_as_they_were(tmp_path):
    model = load_model("toy")
    table = model.pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    res = run(model, ImplantConfig(images=str(_diamonds(tmp_path / "imgs")), token="<thing>", init_word="shape", steps=8))
    learned = load_file(str(res.embedding))["emb_params"][0]
    assert not torch.allclose(learned, init_vector(load_model("toy"), "shape"))
    after = model.pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[: len(table)], table)  # every other word as it was
    assert torch.equal(after[len(table)].float(), learned.float())  # the model now knows the new word
    assert res.model.fingerprint != model.fingerprint


def test_an_interrupted_training_resumes_to_the_same_vector(tmp_path, monkeypatch):
    monkeypatch.setattr(implant_train, "CHECKPOINT_EVERY", 3)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    start = init_vector(load_model("toy"), "shape")

    def train(ckpt, progress=None):
        model = load_model("toy")
        learned = LearnedToken(model, "<thing>", start)
        losses = implant_train.train(model, learned, latents, steps=7, lr=1e-2, batch_size=2, seed=0, templates=("a {}",),
                                     checkpoint=ckpt, key="k", progress=progress)
        return learned.vector.detach(), losses

    straight, _ = train(tmp_path / "a.safetensors")

    def stop(done, total, **_):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b.safetensors", stop)
    assert (tmp_path / "b.safetensors").is_file()  # the checkpoint of step 3
    resumed, losses = train(tmp_path / "b.safetensors")
    assert len(losses) == 7
    assert torch.equal(resumed, straight)


@pytest.mark.parametrize("method", [[], ["--method", "temporal", "-D", "3"], ["--method", "xti"]], ids=["ti", "temporal", "xti"])
def test_every_method_runs_on_tiny_sd_and_its_word_draws(tmp_path, method):
    folder = _noise(tmp_path / "imgs", 3, ".jpg")
    doc = _implant([str(folder), "--model", "tiny-sd", "--token", "<noise>", "--init-word", "dog", "--train-steps", "3", *method])
    assert doc["model"] == "tiny-sd" and Path(doc["embedding"]).is_file() and Path(doc["portable_embedding"]).is_file()
    out = runner.invoke(app, ["generate", "a <noise>", "--model", "tiny-sd", "--embedding", doc["embedding"], "--token", "<noise>",
                              "--count", "1", "--steps", "2", "--out", str(tmp_path / "gen"), "--json"])
    assert out.exit_code == 0, out.output


def test_implant_on_tiny_sdxl_learns_one_vector_per_text_tower(tmp_path):
    folder = _noise(tmp_path / "imgs", 2, ".png")
    doc = _implant([str(folder), "--model", "tiny-sdxl", "--token", "<noise>", "--init-word", "dog", "--train-steps", "3"])
    tensors = load_file(doc["embedding"])
    pipe = load_model("tiny-sdxl").pipe
    widths = (pipe.text_encoder.get_input_embeddings().weight.shape[1], pipe.text_encoder_2.get_input_embeddings().weight.shape[1])
    assert sorted(tensors) == ["clip_g", "clip_l"]  # A1111's and ComfyUI's SDXL layout
    assert (tensors["clip_l"].shape[-1], tensors["clip_g"].shape[-1]) == widths
    # diffusers loads it tower by tower, as its SDXL textual-inversion docs do
    pipe.load_textual_inversion(tensors["clip_l"][0], token="<noise>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"][0], token="<noise>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    out = runner.invoke(app, ["generate", "a <noise>", "--model", "tiny-sdxl", "--embedding", doc["embedding"], "--token", "<noise>",
                              "--count", "1", "--steps", "2", "--out", str(tmp_path / "gen"), "--json"])
    assert out.exit_code == 0, out.output


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    good = _diamonds(tmp_path / "imgs", 3)
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    base = ["--init-word", "shape", "--train-steps", "2"]
    cases = [
        ([str(tmp_path / "empty"), "--token", "<t>", *base], "no PNG or JPG"),
        ([str(tmp_path / "nowhere"), "--token", "<t>", *base], "not a folder"),
        ([str(bad), "--token", "<t>", *base], "broken.png"),
        ([str(good), "--token", "shape", *base], "already a word"),
        ([str(good), "--token", "two words", *base], "one word"),
        ([str(good), "--token", "<t>", "--init-word", " ", "--train-steps", "2"], "--init-word"),
        ([str(good), "--token", "<t>", *base, "--method", "pplus"], "--method"),
        ([str(good), "--token", "<t>", *base, "--lr", "0"], "--lr"),
        ([str(good), "--token", "<t>", "--init-word", "shape", "--train-steps", "0"], "--train-steps"),
        ([str(good), "--token", "<t>", *base, "--method", "temporal", "-D", "17"], "--temporal-dim"),
    ]
    for args, fragment in cases:
        assert fragment in one_line_error(runner.invoke(app, ["implant", *args])), args
    home = tmp_path / "home"
    assert not (home / "data" / "implant").exists() or not any((home / "data" / "implant").iterdir())


def test_temporal_learns_one_vector_per_group_and_d1_is_ti(tmp_path):
    images = str(_diamonds(tmp_path / "imgs", 4))
    ti = run(load_model("toy"), ImplantConfig(images=images, token="<a>", init_word="shape", steps=4))
    d1 = run(load_model("toy"), ImplantConfig(images=images, token="<a>", init_word="shape", steps=4, method="temporal"))
    v_ti = load_file(str(ti.embedding))["emb_params"][0]
    v_d1 = load_file(str(d1.path / d1.manifest["temporal_file"]))["vectors"]
    assert v_d1.shape == (1, v_ti.shape[0]) and torch.allclose(v_d1[0], v_ti, atol=1e-6)
    d3 = run(load_model("toy"), ImplantConfig(images=images, token="<a>", init_word="shape", steps=30, method="temporal", temporal_dim=3))
    vectors = load_file(str(d3.path / "temporal.safetensors"))["vectors"]
    assert vectors.shape[0] == 3 and not torch.allclose(vectors[0], vectors[2])  # the groups learned apart
    with safe_open(str(d3.path / "temporal.safetensors"), framework="pt") as f:
        assert f.metadata()["method"] == "temporal" and f.metadata()["temporal_dim"] == "3"
    portable = load_file(str(d3.embedding))["emb_params"]
    assert torch.allclose(portable[0], vectors.mean(0), atol=1e-6)  # what other tools get: the mean
    assert len(d3.model.tokens_in_time) == 1 and d3.model.fingerprint != d1.model.fingerprint


def test_a_word_in_time_changes_the_conditioning_step_by_step(tmp_path):
    from conceptkit.diffusion import conditioning, sample
    from conceptkit.models.textual_inversion import add_embedding
    from safetensors.torch import save_file

    base = load_model("toy")
    width = base.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(2, width, generator=g) * 0.3
    path = tmp_path / "t.safetensors"
    save_file({"vectors": vectors}, str(path), metadata={"method": "temporal", "temporal_dim": "2"})
    model = add_embedding(base, path, "<w>")
    early = conditioning(model, ["a <w>"], 32, 32, guidance=False, timestep=900).cond
    late = conditioning(model, ["a <w>"], 32, 32, guidance=False, timestep=100).cond
    plain = conditioning(model, ["a <w>"], 32, 32, guidance=False).cond
    assert not torch.allclose(early, late) and not torch.allclose(plain, early)
    # sampling re-encodes the prompt rows at every step: images differ from the mean word's
    same = add_embedding(load_model("toy"), _mean_file(tmp_path, vectors), "<w>")
    a, b = sample(model, "a <w>", [0, 1], 6, 3.0), sample(same, "a <w>", [0, 1], 6, 3.0)
    assert (a - b).abs().max() > 1e-3
    # and with both groups' vectors equal, the word in time is the plain word
    flat = tmp_path / "flat.safetensors"
    save_file({"vectors": vectors.mean(0).expand(2, -1).contiguous()}, str(flat), metadata={"method": "temporal", "temporal_dim": "2"})
    c = sample(add_embedding(load_model("toy"), flat, "<w>"), "a <w>", [0, 1], 6, 3.0)
    assert (c - b).abs().max() < 1e-4


def _mean_file(tmp_path, vectors):
    from safetensors.torch import save_file

    path = tmp_path / "mean.safetensors"
    save_file({"emb_params": vectors.mean(0)[None].contiguous()}, str(path))
    return path


def test_cluster_reads_a_temporal_word_in_its_own_groups(tmp_path):
    images = _diamonds(tmp_path / "imgs", 4)
    doc = _implant([str(images), "--token", "<thing>", "--init-word", "shape", "--train-steps", "6", "--method", "temporal", "-D", "2"])
    assert doc["embedding"].endswith("temporal.safetensors") and doc["temporal_dim"] == 2
    out = runner.invoke(app, ["cluster", "a <thing>", "--embedding", doc["embedding"], "--token", "<thing>", "--samples", "2",
                              "--steps", "4", "--k", "2", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["temporal_dim"] == 2
    bad = runner.invoke(app, ["implant", str(images), "--token", "<x>", "--init-word", "shape", "-D", "2"])
    assert "--temporal-dim" in one_line_error(bad)


def test_xti_learns_one_vector_per_cross_attention_layer_and_each_layer_sees_its_own(tmp_path):
    from conceptkit.diffusion import cross_attention_names, sample
    from conceptkit.models.textual_inversion import add_embedding

    images = str(_diamonds(tmp_path / "imgs", 4))
    res = run(load_model("toy"), ImplantConfig(images=images, token="<x>", init_word="shape", steps=20, method="xti"))
    path = res.path / res.manifest["layers_file"]
    vectors = load_file(str(path))["vectors"]
    layers = cross_attention_names(load_model("toy").pipe.unet)
    assert vectors.shape[0] == len(layers) == len(res.manifest["layers"])
    assert not torch.allclose(vectors[0], vectors[-1])  # the layers learned apart
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["layers"]) == layers and f.metadata()["method"] == "xti"
    model = add_embedding(load_model("toy"), path, "<x>")
    assert len(model.tokens_in_layers) == 1
    mean_only = add_embedding(load_model("toy"), res.embedding, "<x>")  # the portable mean: one vector everywhere
    a, b = sample(model, "a <x>", [0, 1], 6, 3.0), sample(mean_only, "a <x>", [0, 1], 6, 3.0)
    assert (a - b).abs().max() > 1e-3
    # the harvest behind `cluster` samples with each layer's vector too
    from conceptkit import harvest

    cfg = harvest.HarvestConfig(prompts=("a <x>",), samples=2, steps=4)
    finals = [harvest.load_harvest(harvest.run(m, cfg).path).final for m in (model, mean_only)]
    assert (finals[0].float() - finals[1].float()).abs().max() > 1e-3
    out = runner.invoke(app, ["cluster", "a <x>", "--embedding", str(path), "--token", "<x>", "--samples", "2", "--steps", "4",
                              "--k", "2", "--json"])
    assert out.exit_code == 0, out.output
    # a file for another UNet's layers is refused in one line
    other = runner.invoke(app, ["generate", "a <x>", "--model", "tiny-sd", "--embedding", str(path), "--token", "<x>", "--count", "1"])
    assert "another UNet" in one_line_error(other) or "width" in one_line_error(other)
