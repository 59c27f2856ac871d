"""A store holding one artifact of every kind, written once per test module by the real commands."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conceptkit import store, store_admin
from conceptkit.cli import app

runner = CliRunner()
TINY = ["--model", "tiny-sd", "--steps", "2", "--samples", "2"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def full_store(tmp_path_factory):
    """A store holding one artifact of every kind, each written by the real command."""
    home = tmp_path_factory.mktemp("full") / "home"
    images = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("CONCEPTKIT_HOME", str(home))
        cluster = _json(invoke("cluster", "a red circle", *TINY, "--k", "2", "--temporal-dim", "1", "--json"))
        _json(invoke("evaluate", "images", images, "--encoder", "pixel", "--json"))
        sset = _json(invoke("sliders", "a red circle", "-m", "tiny-sd", "--count", "2", "--samples", "2", "--steps", "2",
                            "--train-steps", "2", "--encoder", "pixel", "--json"))
    return home, cluster, sset, images


@pytest.fixture
def store_copy(full_store):
    """This test's own copy of the full store (the autouse fixture points CONCEPTKIT_HOME at it)."""
    home, cluster, sset, images = full_store
    shutil.copytree(home, os.environ["CONCEPTKIT_HOME"], symlinks=True)
    return cluster, sset, images


def _only(kind: str) -> store.Artifact:
    [info] = store_admin.list_artifacts(kind)
    return store.Artifact(kind, info.key, Path(info.path))


def _edit_manifest(art: store.Artifact, edit) -> None:
    m = json.loads(art.manifest_path.read_text())
    m = edit(m)
    art.manifest_path.write_text(m if isinstance(m, str) else json.dumps(m))
