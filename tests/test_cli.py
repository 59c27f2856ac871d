"""The command line: JSON on stdout only, one-line errors with exit code 2, cache management."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from conceptkit.cli import app
from _cli import one_line_error as _one_line_error

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, list(args), input=input)




def test_harvest_json_is_the_only_stdout():
    r = invoke("harvest", "a cat", "--model", "tiny-sd", "--samples", "4", "--steps", "2", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for field in ("key", "path", "model", "prompts", "samples", "steps", "timesteps", "cached"):
        assert field in doc
    assert doc["samples"] == 4 and doc["steps"] == 2 and len(doc["timesteps"]) == 2 and doc["cached"] is False
    again = json.loads(invoke("harvest", "a cat", "--model", "tiny-sd", "--samples", "4", "--steps", "2", "--json").stdout)
    assert again["cached"] is True and again["key"] == doc["key"]


def test_harvest_table_goes_to_stderr():
    r = invoke("harvest", "a cat", "--model", "tiny-sd", "--samples", "2", "--steps", "2")
    assert r.exit_code == 0 and r.stdout == ""
    assert "size on disk" in r.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["harvest", "", "--model", "tiny-sd"], "empty prompt"),
        (["harvest", "   ", "--model", "tiny-sd"], "empty prompt"),
        (["harvest", "a cat", "--model", "tiny-sd", "--samples", "0"], "--samples"),
        (["harvest", "a cat", "--model", "tiny-sd", "--steps", "0"], "--steps"),
        (["harvest", "a cat", "--model", "no-such/model-anywhere"], "no-such/model-anywhere"),
        (["harvest", "a cat", "--model", "tiny-sd", "--prompts-file", "/nonexistent/prompts.txt"], "prompts file"),
        (["harvest", "a cat", "--model", "tiny-sd", "--record", "x0,zz"], "--record"),
        (["harvest", "--model", "tiny-sd"], "PROMPT"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(args, fragment):
    r = invoke(*args)
    line = _one_line_error(r)
    assert fragment in line
    home = os.environ["CONCEPTKIT_HOME"]
    assert not any(p.is_file() and "manifest" in p.name for p in __import__("pathlib").Path(home).rglob("*"))


def test_unwritable_home(tmp_path, monkeypatch):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    monkeypatch.setenv("CONCEPTKIT_HOME", str(blocker / "home"))
    _one_line_error(invoke("harvest", "a cat", "--model", "tiny-sd", "--samples", "1", "--steps", "1"))


def test_prompts_file_and_templates(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n# a comment\na dog\n")
    doc = json.loads(invoke("harvest", "--prompts-file", str(f), "--model", "tiny-sd", "--samples", "2", "--steps", "1", "--json").stdout)
    assert doc["prompts"] == ["a cat", "a dog"]
    doc = json.loads(invoke("harvest", "a cat", "--templates", "--model", "tiny-sd", "--samples", "1", "--steps", "1", "--json").stdout)
    assert "a photo of a cat" in doc["prompts"] and len(doc["prompts"]) > 5


def test_cache_path_list_clear():
    paths = json.loads(invoke("cache", "path", "--json").stdout)
    assert paths["cache"].startswith(os.environ["CONCEPTKIT_HOME"])
    assert json.loads(invoke("cache", "list", "--json").stdout) == []
    key = json.loads(invoke("harvest", "a cat", "--model", "tiny-sd", "--samples", "1", "--steps", "1", "--json").stdout)["key"]
    listed = json.loads(invoke("cache", "list", "--json").stdout)
    assert [(i["kind"], i["key"], i["prompt"], i["model"]) for i in listed] == [("harvest", key, "a cat", "tiny-sd")]
    assert listed[0]["size"] > 0 and listed[0]["complete"] is True
    # clearing everything asks first; without a terminal it refuses rather than guess
    r = invoke("cache", "clear", "--all")
    _one_line_error(r)
    assert len(json.loads(invoke("cache", "list", "--json").stdout)) == 1
    doc = json.loads(invoke("cache", "clear", key, "--json").stdout)
    assert doc["removed"][0]["key"] == key
    assert json.loads(invoke("cache", "list", "--json").stdout) == []
    _one_line_error(invoke("cache", "clear", key))
    _one_line_error(invoke("cache", "clear", "../../etc"))


def test_models_lists_builtins():
    r = invoke("models", "--json")
    assert r.exit_code == 0
    items = {m["name"]: m for m in json.loads(r.stdout)}
    assert {"toy", "tiny-sd", "tiny-sdxl"} <= set(items)
    assert "triangle" in items["toy"]["world"]["factors"]["shape"] and "red" in items["toy"]["world"]["vocabulary"]


def test_harvest_saves_images_with_their_settings(tmp_path):
    from PIL import Image

    doc = json.loads(invoke("harvest", "a cat", "--model", "tiny-sd", "--samples", "2", "--steps", "2", "--seed", "5", "--save-images", str(tmp_path / "img"), "--json").stdout)
    assert len(doc["images"]) == 2
    meta = json.loads(Image.open(doc["images"][1]).text["conceptkit"])
    assert meta["seed"] == 6 and meta["prompt"] == "a cat" and meta["model"]["spec"] == "tiny-sd"
