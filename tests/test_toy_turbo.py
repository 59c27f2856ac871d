"""toy-turbo: the DMD2 student of the toy, its maths, its training's resume, its loading and defaults."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from conceptkit.toy import turbo
from conceptkit.toy.model import ToyArchitecture, build_unet, weights_path
from _cli import one_line_error


def test_dmd_gradient_vanishes_when_critic_agrees_and_points_from_fake_to_real():
    g = torch.Generator().manual_seed(0)
    x0, real, fake = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    assert torch.equal(turbo.dmd_gradient(x0, real, real), torch.zeros_like(x0))
    x = x0.clone().requires_grad_(True)
    grad = turbo.dmd_gradient(x0, real, fake)
    turbo.dmd_loss(x, grad).backward()
    assert torch.allclose(x.grad, grad / grad.numel(), atol=1e-9)
    moved = x0 - x.grad  # a descent step moves each sample toward real_x0 - fake_x0
    assert ((moved - x0) * (real - fake)).sum(dim=(1, 2, 3)).gt(0).all()


def test_backward_simulation_feeds_the_student_what_its_lcm_sampler_does():
    torch.manual_seed(0)
    unet = build_unet(ToyArchitecture(unet_channels=(16, 32))).eval()
    sched = turbo.build_turbo_scheduler()
    abar = sched.alphas_cumprod.float()
    ctx = torch.randn(2, 16, 64)
    noise = torch.randn(2, 4, 8, 8)
    ours = turbo.student_input(unet, ctx, noise, 2, abar, torch.Generator().manual_seed(7))
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == list(turbo.TIMESTEPS)
    x, gen = noise, torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in sched.timesteps[:2]:
            x = sched.step(unet(x, t, ctx).sample, t, x, generator=gen).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)


def _tiny_teacher(folder):
    """A teacher pipeline folder: the shipped tokenizer, text tower and VAE with a tiny random UNet."""
    folder.mkdir()
    for name in ("tokenizer", "text_encoder", "vae", "scheduler", "model_index.json"):
        os.symlink(weights_path() / name, folder / name)
    torch.manual_seed(0)
    build_unet(ToyArchitecture(unet_channels=(16, 32))).save_pretrained(folder / "unet")
    return folder


def test_turbo_training_resumes_bit_exactly(tmp_path):
    from conceptkit.toy.checkpoint import load_latest
    from conceptkit.toy.train_turbo import TurboTrainConfig, train_turbo

    teacher = _tiny_teacher(tmp_path / "teacher")
    cfg = dict(batch=3, checkpoint_every_s=1e9, step_probs=(0.25, 0.25, 0.25, 0.25))
    quiet = lambda m: None  # noqa: E731
    straight = train_turbo(TurboTrainConfig(steps=6, **cfg), teacher, tmp_path / "a", None, log=quiet)
    train_turbo(TurboTrainConfig(steps=3, **cfg), teacher, tmp_path / "b", None, log=quiet)
    logs = []
    resumed = train_turbo(TurboTrainConfig(steps=6, **cfg), teacher, tmp_path / "b", tmp_path / "out", log=logs.append)
    assert any("resumed at step 3" in m for m in logs)
    a, b = load_latest(tmp_path / "a" / "turbo"), load_latest(tmp_path / "b" / "turbo")
    assert a.state["step"] == b.state["step"] == 6 and a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)  # student, critic and both optimisers
    assert all(torch.equal(p, q) for p, q in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert not torch.equal(a.tensors["student/conv_in.weight"], a.tensors["fake/conv_in.weight"])  # both trained, apart
    # a warm start takes the other line's student and critic (fresh optimisers; a negligible rate here)
    logs = []
    warm = train_turbo(TurboTrainConfig(steps=1, **{**cfg, "lr_gen": 1e-12, "lr_fake": 1e-12}), teacher, tmp_path / "b", None,
                       log=logs.append, stage_dir="warm", init_from="turbo")
    assert any("warm start from turbo step 6" in m for m in logs)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(warm.state_dict().values(), resumed.state_dict().values()))
    # other settings on resume are refused rather than silently mixed
    with pytest.raises(ValueError, match="other settings"):
        train_turbo(TurboTrainConfig(steps=7, **{**cfg, "guidance": 5.0}), teacher, tmp_path / "b", None, log=quiet)
    # the export is a plain diffusers folder sharing the teacher's VAE
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    assert isinstance(pipe.scheduler, LCMScheduler) and (tmp_path / "out" / "vae").is_symlink()
    assert all(torch.equal(p, q) for p, q in zip(pipe.unet.state_dict().values(), resumed.state_dict().values()))


def test_turbo_config_refuses_bad_settings():
    from conceptkit.toy.train_turbo import TurboTrainConfig

    for bad in (dict(steps=0), dict(step_probs=(1.0, 0.0)), dict(t_min=500, t_max=400), dict(p_mention=1.5)):
        with pytest.raises(ValueError):
            TurboTrainConfig(**bad)


def test_toy_turbo_loads_offline_with_few_step_defaults():
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from conceptkit.models.load import load_model
    from conceptkit.sliders.defaults import profile_name

    model = load_model("toy-turbo", device="cpu")
    assert (model.source, model.arch) == ("builtin", "sd1")
    assert (model.default_steps, model.default_guidance) == (turbo.STEPS, turbo.GUIDANCE) == (1, 0.0)
    assert isinstance(model.pipe.scheduler, LCMScheduler)
    assert profile_name(model.spec, model.arch, model.default_steps) == "few-step"
    teacher = load_model("toy", device="cpu")
    assert model.fingerprint != teacher.fingerprint
    shared = [torch.equal(p, q) for p, q in zip(model.pipe.vae.state_dict().values(), teacher.pipe.vae.state_dict().values())]
    assert all(shared)  # the VAE (and text tower) are the teacher's, not copies that could drift
    img = model.pipe("a red circle", num_inference_steps=model.default_steps, guidance_scale=model.default_guidance,
                     generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 32, 32, 3)
    plain = StableDiffusionPipeline.from_pretrained(turbo.turbo_path())  # plain diffusers, no conceptkit code
    assert isinstance(plain.scheduler, LCMScheduler)


def test_models_lists_toy_turbo():
    from conceptkit.cli import app

    r = CliRunner().invoke(app, ["models", "--json"])
    assert r.exit_code == 0
    items = {m["name"]: m for m in json.loads(r.stdout)}
    assert "toy-turbo" in items and "DMD2" in items["toy-turbo"]["description"]


def test_turbo_quality_refuses_bad_input_in_one_line(capsys):
    from conceptkit.toy.turbo_quality import main

    for argv in (["--turbo-steps", "9"], ["--turbo-steps", "x"], ["--seeds", "1"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), lines


def test_train_refuses_bad_turbo_input_in_one_line(capsys, tmp_path):
    from conceptkit.toy.train import main

    for argv in (["--stages", "turbo", "--turbo-steps", "0"], ["--stages", "turbo", "--teacher", str(tmp_path)],
                 ["--stages", "turbo", "--turbo-output", str(weights_path())], ["--stages", "turbo", "--turbo-lr", "0"],
                 ["--stages", "turbo", "--turbo-init", "nothing-here"], ["--stages", "nope"]):
        with pytest.raises(SystemExit) as err:
            main(["--workdir", str(tmp_path / "w"), *argv])
        assert err.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), lines


def test_evaluate_sliders_measures_the_distance_to_the_teacher(tmp_path):
    """`evaluate sliders SET --teacher toy` on a toy-turbo set: both distances, the floor, recomputable."""
    import json

    import numpy as np
    from typer.testing import CliRunner

    from conceptkit.cli import app
    from conceptkit.evaluate.common import load_arrays
    from conceptkit.metrics import frechet_distance

    runner = CliRunner()
    made = runner.invoke(app, ["sliders", "a shape", "--model", "toy-turbo", "--count", "2", "--samples", "4", "--train-steps", "2",
                               "--name", "turbo-set", "--json"])
    assert made.exit_code == 0, made.output
    out = runner.invoke(app, ["evaluate", "sliders", "turbo-set", "--teacher", "toy", "--random-baseline", "--count", "8",
                              "--effect-count", "2", "--factor-seeds", "2", "--report", str(tmp_path / "rep"), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    t = doc["teacher"]
    assert t["model"]["spec"] == "toy" and set(t["frechet_distance"]) == {"base", "sliders", "floor", "random_baseline"}
    arrays = load_arrays(doc)
    again = frechet_distance(arrays["base_embeddings"], arrays["teacher_embeddings"])
    assert np.isclose(again, t["frechet_distance"]["base"])
    assert "teacher" in doc["factor_entropy"] and "random_baseline" in doc["factor_entropy"]
    r = doc["random_baseline"]
    assert np.isclose(r["vendi_ratio"] * doc["base"]["vendi"], r["set"]["vendi"]) and r["vendi_ratio_ci"] is not None
    assert np.isclose(frechet_distance(arrays["random_embeddings"], arrays["teacher_embeddings"]), t["frechet_distance"]["random_baseline"])
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "random rank-1 directions" in page and "to the teacher toy" in page
