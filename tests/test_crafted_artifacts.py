"""Artifacts from others are untrusted input: names, labels and files from a manifest or a header
are checked like a user's, every output path stays inside its folder, HTML is escaped, pickles refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptkit import store
from conceptkit.errors import UsageError
from _cli import one_line_error
from _full_store import _edit_manifest, invoke, store_copy, full_store  # noqa: F401 - fixtures

TOY_CLIP = Path(__file__).resolve().parents[1] / "src" / "conceptkit" / "toy" / "weights" / "clip"


def _set(store_copy) -> store.Artifact:
    return store.artifact("sliders", store_copy[1]["name"])


def _sliders(m, **changes):
    m["sliders"][0].update(changes)
    return m


def test_a_slider_file_outside_the_set_is_never_rewritten(store_copy, tmp_path):
    art = _set(store_copy)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(art.path / "slider-00.safetensors", outside)
    before = outside.read_bytes()
    _edit_manifest(art, lambda m: _sliders(m, file="../../../outside.safetensors"))
    assert "slider-00" not in one_line_error(invoke("sliders", "rename", art.key, "0", "wobble"))
    # the same through a link inside the set
    _edit_manifest(art, lambda m: _sliders(m, file="slider-00.safetensors"))
    (art.path / "slider-00.safetensors").unlink()
    (art.path / "slider-00.safetensors").symlink_to(outside)
    assert "outside" in one_line_error(invoke("sliders", "rename", art.key, "0", "wobble"))
    assert outside.read_bytes() == before


def test_a_pickle_in_place_of_a_slider_file_is_refused_never_loaded(store_copy, monkeypatch):
    art = _set(store_copy)
    torch.save({"unet.x.lora_A.weight": torch.zeros(1, 4)}, art.path / "slider-00.safetensors")

    def no_unpickling(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for args in (["sliders", "rename", art.key, "0", "wobble"],
                 ["generate", "a red circle", "-m", "tiny-sd", "--steps", "1", "--count", "1", "--slider", f"{art.key}/0=1"]):
        assert "never loaded" in one_line_error(invoke(*args))
    assert invoke("cache", "verify").exit_code == 1


def test_a_set_name_with_dots_in_its_manifest_writes_no_export_above_the_folder(store_copy, tmp_path):
    art = _set(store_copy)
    _edit_manifest(art, lambda m: {**m, "name": "../../escaped"})
    export = tmp_path / "a" / "b" / "export"
    line = one_line_error(invoke("sliders", "export", art.key, export))
    assert "name" in line and str(art.path) in line
    assert not list(tmp_path.rglob("*escaped*"))


def test_a_label_with_dots_never_puts_a_sweep_grid_outside_out(store_copy, tmp_path):
    art = _set(store_copy)
    _edit_manifest(art, lambda m: _sliders(m, label="x/../../../../ESCAPED"))
    out = tmp_path / "a" / "b" / "c" / "out"
    line = one_line_error(invoke("generate", "a red circle", "-m", "tiny-sd", "--steps", "1", "--count", "1",
                                 "--sweep", f"{art.key}/0=-1:1:2", "--out", out))
    assert "label" in line and str(art.path) in line
    assert not list(tmp_path.rglob("*ESCAPED*"))


def test_output_paths_are_resolved_inside_their_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link.png").symlink_to(tmp_path / "elsewhere.png")
    for name in ("x/../../a.png", "..", "", "a\\b.png", "link.png"):
        with pytest.raises(UsageError):
            store.inside(tmp_path / "out", name)
    assert store.inside(tmp_path / "out", "a-1.png") == tmp_path / "out" / "a-1.png"


def _images(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_an_encoder_folder_named_with_html_is_escaped_in_the_report(tmp_path):
    enc = tmp_path / "<img src=x onerror=alert(1)>"
    enc.mkdir()
    for f in ("config.json", "model.safetensors"):  # no tokenizer: the report explains why there is no CLIP score
        shutil.copy(TOY_CLIP / f, enc / f)
    r = invoke("evaluate", "images", _images(tmp_path / "a"), "--prompt", "a shape", "--encoder", f"toy:{enc}",
               "--report", tmp_path / "report", "--json")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "report" / "report.html").read_text()
    assert "has no text tower" in page and "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_an_encoder_folder_with_pickled_weights_is_refused_up_front(tmp_path, monkeypatch):
    enc = tmp_path / "enc"
    enc.mkdir()
    shutil.copy(TOY_CLIP / "config.json", enc / "config.json")
    torch.save({"w": torch.zeros(2)}, enc / "pytorch_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for spec in (f"clip:{enc}", f"dinov2:{enc}", f"toy:{enc}"):
        line = one_line_error(invoke("evaluate", "images", _images(tmp_path / f"a{len(spec)}"), "--encoder", spec))
        assert "pytorch_model.bin" in line and "safetensors" in line
    line = one_line_error(invoke("sliders", "a shape", "-m", "tiny-sd", "--encoder", f"clip:{enc}"))
    assert "pickled" in line and not store.kind_dir("harvest").exists()  # refused before any work
