"""`conceptkit generate`: sliders add up, strength 0 is the base model, PNGs carry their settings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conceptkit import store
from conceptkit.cli import app
from conceptkit.errors import UsageError
from conceptkit.generate import (
    GenerateConfig,
    SliderModification,
    parse_sweep,
    sample,
)
from conceptkit.sliders.sets import load_set, parse_ref
from _sets import train_tiny_set
from _cli import one_line_error as _one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-slider tiny-sd set (pixel encoder), briefly trained once."""
    model, sset = train_tiny_set(tmp_path_factory, count=3, samples=4, steps=4, lr=2e-2)
    return model, sset


@pytest.fixture
def model(trained):
    dest = store.kind_dir("sliders") / trained[1].name
    shutil.copytree(trained[1].path, dest)
    return trained[0]




def test_strength_zero_is_the_base_model_and_sliders_add_up(model):
    sset = load_set("a-shape")
    chosen = [(sset, sset.sliders[0]), (sset, sset.sliders[1])]
    base = sample(model, "a shape", [3, 4], 4, 7.5)
    mod = SliderModification(model.pipe.unet, chosen, cfg_batches=True)
    try:
        mod.set_weights({("a-shape", 0): 0.0, ("a-shape", 1): 0.0})
        assert torch.equal(sample(model, "a shape", [3, 4], 4, 7.5, [mod]), base)
        mod.set_weights({("a-shape", 0): 3.0})
        one = sample(model, "a shape", [3, 4], 4, 7.5, [mod])
        assert (one - base).abs().max() > 1e-4
        # per-image weights (the --random-sliders path) equal the shared ones image by image
        mod.set_weights([{("a-shape", 0): 3.0}, {}])
        mixed = sample(model, "a shape", [3, 4], 4, 7.5, [mod])
        assert torch.allclose(mixed[0], one[0], atol=1e-5) and torch.allclose(mixed[1], base[1], atol=1e-5)
    finally:
        mod.remove()
    assert torch.equal(sample(model, "a shape", [3, 4], 4, 7.5), base)  # removed cleanly


def test_generate_writes_pngs_with_their_settings(model, tmp_path):
    r = runner.invoke(app, ["generate", "a shape", "-m", "tiny-sd", "--slider", "direction-0=1.5", "--slider", "2=-1",
                            "--count", "2", "--seed", "5", "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["files"]) == 2 and [f["seed"] for f in doc["files"]] == [5, 6]
    meta = json.loads(Image.open(doc["files"][0]["path"]).text["conceptkit"])
    assert meta["prompt"] == "a shape" and meta["seed"] == 5 and meta["model"]["spec"] == "tiny-sd"
    assert {(s["index"], s["scale"]) for s in meta["sliders"]} == {(0, 1.5), (2, -1.0)}
    assert "Seed: 5" in Image.open(doc["files"][0]["path"]).text["parameters"]


def test_cli_at_strength_zero_equals_base(model, tmp_path):
    a = runner.invoke(app, ["generate", "a shape", "-m", "tiny-sd", "--count", "1", "--out", str(tmp_path / "a"), "--json"])
    b = runner.invoke(app, ["generate", "a shape", "-m", "tiny-sd", "--count", "1", "--slider", "0=0",
                            "--out", str(tmp_path / "b"), "--json"])
    pa, pb = (json.loads(x.stdout)["files"][0]["path"] for x in (a, b))
    assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))


def test_sweep_is_one_grid_and_sliders_transfer_to_another_prompt(model, tmp_path):
    r = runner.invoke(app, ["generate", "a dog", "-m", "tiny-sd", "--sweep", "a-shape/0=-2:2:3", "--count", "2",
                            "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    files = json.loads(r.stdout)["files"]
    assert len(files) == 1 and files[0]["sweep"]["strengths"] == [-2.0, 0.0, 2.0]
    img = Image.open(files[0]["path"])
    assert img.size == (3 * 34 + 2, 14 + 2 * 34 + 2)  # a 14 px header, 3 strengths x 2 seeds of 32 px, 2 px gaps
    arr = np.asarray(img).astype(int)
    header = arr[:14]
    for q in range(3):  # each column's strength is written above it
        assert (header[:, 2 + q * 34: 34 + q * 34] < 128).any(), q
    left, mid = arr[16:48, 2:34], arr[16:48, 36:68]
    assert np.abs(left - mid).max() > 0  # the slider changes the other prompt's image
    assert json.loads(img.text["conceptkit"])["prompt"] == "a dog"


def test_random_sliders_are_recorded(model, tmp_path):
    r = runner.invoke(app, ["generate", "a shape", "-m", "tiny-sd", "--random-sliders", "2", "--count", "3",
                            "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    files = json.loads(r.stdout)["files"]
    assert all(len(f["sliders"]) == 2 for f in files)
    assert len({tuple((s["index"], s["scale"]) for s in f["sliders"]) for f in files}) == 3
    meta = json.loads(Image.open(files[0]["path"]).text["conceptkit"])
    assert meta["random_sliders"] == 2 and len(meta["sliders"]) == 2


def test_ambiguous_label_lists_the_candidates(model):
    src = store.kind_dir("sliders") / "a-shape"
    shutil.copytree(src, src.with_name("a-shape-2"))
    m = json.loads((src.with_name("a-shape-2") / "manifest.json").read_text())
    m["name"] = "a-shape-2"
    (src.with_name("a-shape-2") / "manifest.json").write_text(json.dumps(m))
    line = _one_line_error(runner.invoke(app, ["generate", "a shape", "-m", "tiny-sd", "--slider", "direction-1=1"]))
    assert "ambiguous" in line and "a-shape/direction-1" in line and "a-shape-2/direction-1" in line


def test_another_base_model_is_refused_unless_forced(model, tmp_path):
    path = store.kind_dir("sliders") / "a-shape" / "manifest.json"
    m = json.loads(path.read_text())
    m["model"]["fingerprint"] = "0" * 64
    path.write_text(json.dumps(m))
    line = _one_line_error(runner.invoke(app, ["generate", "a dog", "-m", "tiny-sd", "--slider", "a-shape/0=1"]))
    assert "trained for" in line and "--force" in line
    r = runner.invoke(app, ["generate", "a dog", "-m", "tiny-sd", "--slider", "a-shape/0=1", "--force", "--count", "1",
                            "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0 and "warning" in r.stderr and json.loads(r.stdout)["files"]


@pytest.mark.parametrize("args, fragment", [
    (["--slider", "age"], "malformed --slider"),
    (["--slider", "a/b/c=1"], "malformed --slider"),
    (["--slider", "0=big"], "not a number"),
    (["--slider", "0=nan"], "finite"),
    (["--slider", "nosuch/0=1"], "no slider set"),
    (["--slider", "a-shape/wings=1"], "no slider 'wings'"),
    (["--slider", "a-shape/7=1"], "out of range"),
    (["--slider", "../x/0=1"], "malformed"),
    (["--sweep", "0=-2:2"], "malformed --sweep"),
    (["--sweep", "0=a:2:3"], "numbers"),
    (["--count", "0"], "--count"),
    (["--random-sliders", "9"], "exceeds"),
])
def test_bad_input_is_one_line_exit_2(model, args, fragment):
    assert fragment in _one_line_error(runner.invoke(app, ["generate", "a shape", "-m", "tiny-sd", *args]))


def test_without_a_set_for_the_prompt_it_says_how_to_name_one(model):
    line = _one_line_error(runner.invoke(app, ["generate", "a cat", "-m", "tiny-sd", "--slider", "0=1"]))
    assert "no slider set trained for 'a cat'" in line


def test_parsers():
    assert parse_ref("a-person/age=-1.5").set == "a-person" and parse_ref("3=2").slider == "3"
    assert parse_sweep("age=-2:2:5").strengths == (-2.0, -1.0, 0.0, 1.0, 2.0)
    with pytest.raises(UsageError):
        GenerateConfig("a dog", sliders=("age=",))
