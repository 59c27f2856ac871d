"""Strength calibration (`sliders.calibrate`): the maths, the factor folded into the files, keys and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conceptkit.cli import app
from conceptkit.sliders import calibrate
from _cli import one_line_error

runner = CliRunner()


def test_spread_is_the_std_along_each_direction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)) * np.array([3.0, 1.0, 0.5])
    dirs = np.array([[1.0, 0, 0], [0, 0, 1.0]])
    assert np.allclose(calibrate.spread(x, dirs), x[:, [0, 2]].std(0))


def test_next_scale_proportional_then_secant_and_bounded():
    assert calibrate.next_scale(1.0, 0.05, target=0.2) == pytest.approx(4.0)
    # a response r = 0.1 * c ** 0.5: the secant finds the exponent and lands on the target
    r = lambda c: 0.1 * c ** 0.5  # noqa: E731
    c = calibrate.next_scale(1.0, r(1.0), 4.0, r(4.0), target=0.2)
    assert r(c) == pytest.approx(0.2) and c == pytest.approx(4.0)
    assert calibrate.next_scale(1.0, 1e-9, target=0.2) == calibrate.MAX_SCALE
    assert calibrate.next_scale(1.0, 10.0, target=0.2) == pytest.approx(1 / calibrate.MAX_SCALE)
    assert calibrate.next_scale(1.0, 0.0, target=0.2) == 4.0  # nothing moved: step up


def _pair(tmp_path_factory):
    """The same tiny-sd set trained twice, without and with calibration."""
    from conceptkit.models.load import load_model
    from conceptkit.sliders.pipeline import SlidersConfig, run
    from conceptkit.sliders.train import TrainSettings

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONCEPTKIT_HOME", str(home))
        model = load_model("tiny-sd", device="cpu")
        common = dict(count=2, samples=4, encoder="pixel", train=TrainSettings(steps=20, lr=2e-2))
        off = SlidersConfig("a shape", name="plain", **common)
        plain = run(model, off)
        cal = run(model, SlidersConfig("a shape", name="cal", calibration_seeds=2, **common))
    return model, plain, cal, off


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return _pair(tmp_path_factory)


def test_the_factor_is_folded_into_lora_b_and_recorded(pair):
    _, plain, cal, _ = pair
    c = cal.manifest["calibration"]
    assert "calibration" not in plain.manifest
    assert c["seeds"] == 2 and c["target"] == calibrate.TARGET and 1 / calibrate.MAX_SCALE <= c["scale"] <= calibrate.MAX_SCALE
    assert len(c["before"]) == len(c["after"]) == len(c["sigma"]) == 2
    for a, b in zip(plain.sliders, cal.sliders):
        pa, pb = load_file(plain.path / a.file), load_file(cal.path / b.file)
        assert pa.keys() == pb.keys()
        for k in pa:
            want = pa[k] * c["scale"] if ".lora_B." in k else pa[k]
            assert torch.allclose(pb[k], want, rtol=1e-5, atol=1e-7), k
    # what strength 1 does now is what strength `scale` did before
    with open(cal.path / "manifest.json") as f:
        assert json.load(f)["settings"]["calibration_seeds"] == 2


def test_calibration_enters_the_key_only_when_on(pair):
    from conceptkit.sliders.pipeline import set_key

    model, plain, cal, off = pair
    assert plain.manifest["settings_key"] == set_key(model, off, "pixel")
    assert cal.manifest["settings_key"] != plain.manifest["settings_key"]
    assert plain.manifest["settings"]["calibration_seeds"] == 0  # recorded, but only a non-zero value enters the key


def test_a_slider_that_moves_nothing_is_left_at_scale_1():
    class Bank:  # a trained bank whose sliders do nothing
        num_sliders = 2
        lora_B = [torch.ones(2, 3)]

        def set_dense_routing(self, _w):
            pass

    class Encoder:
        def embed(self, images):
            return torch.zeros(len(images), 4)

    import conceptkit.sliders.calibrate as cal_mod

    orig = cal_mod.sample
    cal_mod.sample = lambda model, prompt, seeds, steps, guidance, mods: torch.zeros(len(seeds), 3, 8, 8)
    try:
        bank = Bank()
        out = calibrate.calibrate(None, bank, Encoder(), "a shape", np.eye(4)[:2], np.random.default_rng(0).normal(size=(10, 4)),
                                  seeds=2, steps=4, guidance=3.0, start=0.1)
    finally:
        cal_mod.sample = orig
    assert out.scale == 1.0 and "left at scale 1" in out.note and torch.equal(bank.lora_B[0], torch.ones(2, 3))


@pytest.mark.parametrize("value", ["-1", "257"])
def test_cli_calibration_seeds_out_of_range(value):
    line = one_line_error(runner.invoke(app, ["sliders", "a shape", "-m", "tiny-sd", "--calibration-seeds", value]))
    assert "--calibration-seeds" in line and "0 and 256" in line


def test_dry_run_counts_the_calibration():
    r = runner.invoke(app, ["sliders", "a shape", "-m", "tiny-sd", "--count", "2", "--samples", "4", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["defaults"]["calibration_seeds"] == 2 and "calibration_seeds" in doc["defaults"]["from_profile"]
    assert doc["plan"]["calibration_s"] > 0
    r = runner.invoke(app, ["sliders", "a shape", "-m", "tiny-sd", "--count", "2", "--samples", "4", "--dry-run", "--json",
                            "--calibration-seeds", "0"])
    assert json.loads(r.stdout)["plan"]["calibration_s"] == 0
