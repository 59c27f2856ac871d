"""Slider training across kills and full disks: the loss history survives a resume, finished sets
keep no work folder, a failed write leaves no empty folders."""

from __future__ import annotations

import errno
import json

import pytest

from conceptkit import harvest, store
from conceptkit.errors import StoreError
from conceptkit.sliders.train import TrainSettings


@pytest.fixture(scope="module")
def tiny():
    from conceptkit.models.load import load_model

    return load_model("tiny-sd", device="cpu")


CFG = dict(count=2, samples=4, encoder="pixel")


def test_loss_first_is_the_first_loss_of_the_training_after_a_resume(tiny, monkeypatch):
    from conceptkit.sliders import train as slider_train
    from conceptkit.sliders.pipeline import SlidersConfig, run

    monkeypatch.setattr(slider_train, "CHECKPOINT_EVERY", 3)
    cfg = SlidersConfig("a cube", **CFG, train=TrainSettings(steps=6))
    seen = {}

    def killer(done, total, **kw):
        if "loss" in kw:
            seen.setdefault(done, kw["loss"])
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny, cfg, progress=killer)
    sset = run(tiny, cfg)
    assert sset.manifest["loss"]["first"] == pytest.approx(seen[1], rel=1e-6)  # step 1's loss, from the first run
    # a finished set keeps no work folder, even one left by a run killed after the rename
    work = sset.path.parent / ".work-a-cube"
    work.mkdir()
    (work / "state.json").write_text(json.dumps({"key": sset.manifest["settings_key"], "name": "a-cube"}))
    (work / "checkpoint.safetensors").write_bytes(b"old")
    assert run(tiny, cfg).cached and not work.exists()


def _full_disk(monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", no_space)


def test_a_full_disk_leaves_no_empty_key_or_work_folder(tiny, monkeypatch):
    from conceptkit.sliders.pipeline import SlidersConfig, run

    with monkeypatch.context() as m:
        _full_disk(m)
        with pytest.raises(StoreError, match="No space left"):
            harvest.run(tiny, harvest.HarvestConfig(prompts=("a cone",), samples=2, steps=2))
    assert [p.name for p in store.kind_dir("harvest").iterdir() if not p.name.startswith(".")] == []

    def disk_fills_at_training(message):
        if message.startswith("training"):
            _full_disk(monkeypatch)

    with pytest.raises(StoreError, match="No space left"):
        run(tiny, SlidersConfig("a cone", **CFG, train=TrainSettings(steps=2)), stage=disk_fills_at_training)
    assert [p.name for p in store.kind_dir("sliders").iterdir() if not p.name.endswith(".lock")] == []


def test_training_also_checkpoints_by_time_so_a_kill_loses_at_most_about_a_minute(tiny, monkeypatch):
    from conceptkit.sliders import train as slider_train
    from conceptkit.sliders.pipeline import SlidersConfig, run

    saved = []
    real = slider_train.save_checkpoint
    monkeypatch.setattr(slider_train, "CHECKPOINT_EVERY_S", 0.0)  # every step is a minute later
    monkeypatch.setattr(slider_train, "save_checkpoint", lambda path, bank, opt, step, *a, **k: (saved.append(step), real(path, bank, opt, step, *a, **k)))
    run(tiny, SlidersConfig("a sphere", **CFG, train=TrainSettings(steps=4)))
    assert saved == [1, 2, 3]  # far below CHECKPOINT_EVERY steps; none after the last step (the set is written)
