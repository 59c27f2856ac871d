"""The store: keys, names, atomic writes, locks, listing and clearing."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from conceptkit import store, store_admin
from conceptkit.errors import ArtifactNotFoundError, StoreError, UsageError


def test_home_override_puts_everything_under_one_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTKIT_HOME", str(tmp_path / "h"))
    r = store.roots()
    assert r["cache"] == tmp_path / "h" / "cache" and r["data"] == tmp_path / "h" / "data"
    assert store.kind_dir("sliders").parent == r["data"]
    assert store.kind_dir("harvest").parent == r["cache"]


def test_key_is_stable_and_sensitive():
    a = store.make_key({"model": {"fingerprint": "ab"}, "prompts": ["a cat"], "steps": 4})
    assert a == store.make_key({"steps": 4, "prompts": ["a cat"], "model": {"fingerprint": "ab"}})
    assert a != store.make_key({"model": {"fingerprint": "ac"}, "prompts": ["a cat"], "steps": 4})
    assert len(a) == 16


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "..", "", ".hidden", "x" * 65, "a b", "a\\b", "a..b"])
def test_names_cannot_escape_the_store(name):
    with pytest.raises(UsageError):
        store.artifact("sliders", name)


def test_good_names_stay_inside(tmp_path):
    art = store.artifact("sliders", "a-person_v2.1")
    assert art.path.resolve().is_relative_to(store.kind_dir("sliders").resolve())


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path):
    target = tmp_path / "t.json"
    store.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with store.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert store.read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_tensors_round_trip_with_metadata(tmp_path):
    x = torch.randn(3, 4)
    store.write_tensors(tmp_path / "x.safetensors", {"x": x}, {"prompt": "a cat"})
    assert torch.equal(load_file(tmp_path / "x.safetensors")["x"], x)


def test_unwritable_home_is_a_store_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CONCEPTKIT_HOME", str(blocker / "home"))
    with pytest.raises(StoreError, match="CONCEPTKIT_HOME"):
        store.write_json(store.kind_dir("harvest") / "k" / "manifest.json", {})


def _hold_lock(home, key, started, seconds):
    os.environ["CONCEPTKIT_HOME"] = home
    art = store.artifact("evaluate", key)
    with art.lock():
        started.set()
        time.sleep(seconds)
        art.write_manifest({"writer": os.getpid()})


def test_lock_serialises_two_processes(tmp_path):
    home = os.environ["CONCEPTKIT_HOME"]
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(home, "k1", started, 1.5))
    p.start()
    assert started.wait(30)
    waited = []
    art = store.artifact("evaluate", "k1")
    with art.lock(on_wait=waited.append):
        # we only get the lock after the other process wrote its manifest
        assert art.manifest()["writer"] == p.pid
    p.join(10)
    assert waited and "waiting" in waited[0] and f"process {p.pid}" in waited[0]  # says whom it waits for


def test_list_find_and_clear():
    for key, prompt in (("aaaa1111", "a cat"), ("bbbb2222", "a dog")):
        art = store.artifact("harvest", key)
        art.write_manifest({"prompts": [prompt], "model": {"spec": "tiny-sd"}, "settings": {}, "complete": True,
                            "created": time.time()})
        store.write_tensors(art.path / "shard.safetensors", {"x": torch.zeros(10)})
    infos = store_admin.list_artifacts()
    assert {(i.key, i.prompt, i.model) for i in infos} == {("aaaa1111", "a cat", "tiny-sd"), ("bbbb2222", "a dog", "tiny-sd")}
    assert all(i.size > 40 for i in infos)
    assert store.find("harvest", "aaaa").key == "aaaa1111"
    with pytest.raises(ArtifactNotFoundError):
        store.find("harvest", "cccc")
    removed = store_admin.clear(key="aaaa1111")
    assert [i.key for i in removed] == ["aaaa1111"]
    assert [i.key for i in store_admin.list_artifacts()] == ["bbbb2222"]
    store_admin.clear(kind="harvest")
    assert store_admin.list_artifacts() == []
    with pytest.raises(ArtifactNotFoundError):
        store_admin.clear(key="aaaa1111")
