"""`evaluate sliders FILE.safetensors`: a published LoRA slider measured on the same seeds as a discovered set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conceptkit import store
from conceptkit.evaluate import common as evaluation
from conceptkit.cli import app
from _sets import train_tiny_set
from _cli import one_line_error
from test_lora_import import kohya_file

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-slider tiny-sd set (pixel encoder) and a kohya LoRA file for the same UNet."""
    model, sset = train_tiny_set(tmp_path_factory, count=2, samples=4, steps=3, lr=2e-2)
    lora = kohya_file(model.pipe.unet, tmp_path_factory.mktemp("loras") / "published-slider.safetensors", std=0.4)
    return sset, lora


@pytest.fixture
def installed(trained):
    shutil.copytree(trained[0].path, store.kind_dir("sliders") / trained[0].name)
    return trained


def _evaluate(*args):
    r = runner.invoke(app, ["evaluate", "sliders", *args, "--count", "4", "--effect-count", "2", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_a_lora_file_is_measured_on_the_set_s_seeds(installed):
    sset, lora = installed
    ours = _evaluate("a-shape")
    theirs = _evaluate(str(lora), "--like", "a-shape")
    assert theirs["set"] == "published-slider" and theirs["prompt"] == ours["prompt"] == "a shape"
    assert (theirs["steps"], theirs["guidance"], theirs["encoder"], theirs["model"]) == \
           (ours["steps"], ours["guidance"], ours["encoder"], ours["model"])
    a, b = evaluation.load_arrays(ours), evaluation.load_arrays(theirs)
    assert np.array_equal(a["base_embeddings"], b["base_embeddings"])  # the same base images: same seeds, same settings
    assert b["effect_plus_embeddings"].shape[:2] == (1, 2) and b["slider_weights"].shape == (4, 1)
    assert (b["slider_weights"] != 0).all() and np.abs(b["slider_weights"]).max() <= 2.0
    # its effect size, recomputed from the saved embeddings, and visibly non-zero
    base = b["base_embeddings"][:2].astype(np.float64)
    plus = b["effect_plus_embeddings"][0].astype(np.float64)
    (row,) = theirs["per_slider"]
    assert row["label"] == "published-slider"
    assert row["effect_size"] == pytest.approx(np.sqrt(((plus - base) ** 2).sum(1)).mean(), rel=1e-5)
    assert row["effect_size"] > 1e-3
    assert not np.array_equal(b["slider_embeddings"], b["base_embeddings"])
    # a second run is the cached one; another start is another evaluation
    assert _evaluate(str(lora), "--like", "a-shape")["cached"]
    later = _evaluate(str(lora), "--like", "a-shape", "--start", "0.5")
    assert not later["cached"] and later["per_slider"][0]["effect_size"] != row["effect_size"]


def test_a_lora_file_without_a_set(trained):
    _, lora = trained
    doc = _evaluate(str(lora), "-m", "tiny-sd", "--prompt", "a shape", "--encoder", "pixel")
    assert doc["steps"] == 4 and doc["guidance"] == 7.5 and doc["encoder"].startswith("pixel")


def test_bad_evaluate_input_is_one_line_exit_2(installed, tmp_path):
    _, lora = installed
    te = tmp_path / "with-te.safetensors"
    from safetensors.torch import load_file

    sd = load_file(str(lora))
    sd.update({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(1, 32),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 1),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0)})
    save_file(sd, str(te))
    cases = [
        (["a-shape", "--prompt", "a dog"], "apply to a LoRA file"),
        ([str(lora), "-m", "tiny-sd"], "--prompt"),
        ([str(lora), "--like", "a-shape", "--start", "1.5"], "--start"),
        ([str(tmp_path / "gone.safetensors"), "--like", "a-shape"], "no such file"),
        ([str(lora) + ":2", "--like", "a-shape"], "without :SCALE"),
        ([str(lora), "--like", "a-shape", "--random-baseline"], "--random-baseline"),
    ]
    for args, fragment in cases:
        r = runner.invoke(app, ["evaluate", "sliders", *args, "--count", "4", "--effect-count", "2"])
        assert fragment in one_line_error(r), args
    r = runner.invoke(app, ["evaluate", "sliders", str(te), "--like", "a-shape", "--count", "4", "--effect-count", "2"])
    assert "also changes the text encoder" in one_line_error(r)
