"""A store that explains and heals itself: damaged artifacts listed, verified, cleared or recomputed;
links, leftovers and overlapping shards handled; file modes as a plain write gives them."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

from conceptkit import harvest, harvest_shards, store, store_admin
from conceptkit.errors import DamagedArtifactError, StoreError
from conceptkit.tensor_files import BadTensorFile, read_header
from _cli import one_line_error
from _full_store import TINY, _edit_manifest, _json, _only, full_store, invoke, store_copy  # noqa: F401 - fixtures


# ---------------------------------------------------------------- part 3: one schema per kind


def test_a_store_with_every_kind_lists_verifies_and_clears(store_copy):
    listed = _json(invoke("cache", "list", "--json"))
    assert sorted(i["kind"] for i in listed) == ["cluster", "evaluate", "harvest", "neurons", "sliders"]
    assert all(i["complete"] and not i["damaged"] for i in listed), listed
    cluster = next(i for i in listed if i["kind"] == "cluster")
    assert cluster["model"] == "tiny-sd"  # the cluster manifest's string `model` reads
    assert json.loads(_only("cluster").manifest_path.read_text())["schema"] == 2
    assert _json(invoke("cache", "verify", "--json"))["damaged"] == []
    doc = _json(invoke("cache", "clear", "--all", "--yes", "--json"))
    assert len(doc["removed"]) == 5 and _json(invoke("cache", "list", "--json")) == []


def test_manifests_written_before_schemas_still_read(store_copy):
    # what the old writers wrote: no "schema" field, no shard checksums
    art = _only("harvest")
    _edit_manifest(art, lambda m: {k: v for k, v in m.items() if k not in ("schema", "checksums")})
    assert harvest.load_harvest(art.path).x0.shape[0] == 2
    assert _json(invoke("cache", "verify", "--json"))["damaged"] == []


def test_one_schema_serves_writer_and_reader():
    from conceptkit.store_schema import check_manifest

    cluster = {"neurons": "abcd1234", "k": 2, "temporal_dim": 1}
    assert check_manifest("cluster", {**cluster, "model": "tiny-sd"}) == []  # what the first writers wrote
    assert check_manifest("cluster", {**cluster, "model": {"spec": "tiny-sd"}}) == []
    assert check_manifest("cluster", {**cluster, "model": "tiny-sd", "neurons": "../x"}) != []
    sliders = {"name": "s", "prompt": "p", "model": {"spec": "m"}, "encoder": "pixel",
               "settings": {"rank": 1, "alpha": 1.0, "targets": "t"},
               "sliders": [{"index": 0, "label": "red", "file": "slider-00.safetensors", "explained_variance": 0.5},
                           {"index": 1, "label": "Red", "file": "slider-01.safetensors", "explained_variance": 0.2}]}
    assert check_manifest("sliders", sliders) == ["slider labels are not unique"]
    with pytest.raises(StoreError, match="refusing to write an invalid cluster manifest"):
        store.artifact("cluster", "abcd1234").write_manifest({"model": "tiny-sd", "k": "two", "temporal_dim": 1,
                                                             "neurons": "ffff0000"})
    assert not store.artifact("cluster", "abcd1234").exists()


@pytest.mark.parametrize("kind", ["harvest", "neurons", "cluster", "evaluate", "sliders"])
@pytest.mark.parametrize("damage", [
    lambda m: "[1, 2]",                              # a list, not an object
    lambda m: {**m, "created": "yesterday"},         # a non-numeric created
    lambda m: {**m, "prompts": 3, "model": [1]},     # wrong types
    lambda m: '{"kind": "harvest", ',                # cut off mid-write by another tool
])
def test_a_damaged_manifest_is_listed_verified_and_cleared(store_copy, kind, damage):
    art = _only(kind)
    _edit_manifest(art, damage)
    listed = {i["kind"]: i for i in _json(invoke("cache", "list", "--json"))}
    assert listed[kind]["damaged"] and listed[kind]["path"] == str(art.path)
    assert all(not i["damaged"] for k, i in listed.items() if k != kind)
    table = invoke("cache", "list")
    assert table.exit_code == 0 and f"damaged: {art.path}" in table.stderr and f"cache clear {art.key} --kind {kind}" in table.stderr
    r = invoke("cache", "verify", "--json")
    assert r.exit_code == 1 and [d["path"] for d in json.loads(r.stdout)["damaged"]] == [str(art.path)]
    assert _json(invoke("cache", "clear", art.key, "--kind", kind, "--json"))["removed"][0]["key"] == art.key
    assert not art.path.exists()


def test_a_command_recomputes_a_damaged_cache_and_says_so(store_copy):
    art = _only("harvest")
    _edit_manifest(art, lambda m: {**m, "samples": "two"})
    r = invoke("harvest", "a red circle", *TINY, "--json")
    assert r.exit_code == 0, r.output
    assert "damaged harvest artifact" in r.stderr and "recomputing it" in r.stderr
    assert json.loads(r.stdout)["computed"] == 2


@pytest.mark.parametrize("kind", ["neurons", "evaluate"])
def test_cluster_and_evaluate_recompute_a_damaged_cache_and_say_so(store_copy, kind):
    art = _only(kind)
    _edit_manifest(art, lambda m: {**m, "created": None})
    if kind == "neurons":
        r = invoke("cluster", "a red circle", *TINY, "--k", "2", "--temporal-dim", "1", "--json")
    else:
        r = invoke("evaluate", "images", store_copy[2], "--encoder", "pixel", "--json")
    assert r.exit_code == 0, r.output
    assert f"damaged {kind} artifact {art.path}" in r.stderr and "recomputing it" in r.stderr
    art.manifest()  # sound again


def test_a_truncated_neurons_step_is_reported_and_recomputed(store_copy):
    art = _only("neurons")
    step = art.path / "step-0000.safetensors"
    step.write_bytes(step.read_bytes()[:-100])
    r = invoke("cache", "verify", "--json")
    assert r.exit_code == 1 and "truncated" in json.loads(r.stdout)["damaged"][0]["problems"][0]
    r = invoke("cluster", "a red circle", *TINY, "--k", "2", "--temporal-dim", "1", "--json")
    assert r.exit_code == 0 and "step-0000.safetensors is truncated" in r.stderr and "recomputing it" in r.stderr
    assert _json(invoke("cache", "verify", "--json"))["damaged"] == []


def test_a_damaged_slider_set_is_named_with_its_path_and_the_fix(store_copy):
    _, sset, _ = store_copy
    art = store.artifact("sliders", sset["name"])
    _edit_manifest(art, lambda m: {**m, "sliders": "none"})
    for args in (["sliders", "show", sset["name"]], ["generate", "a red circle", "-m", "tiny-sd", "--slider", f"{sset['name']}/0=1"]):
        line = one_line_error(invoke(*args))
        assert str(art.path) in line and f"cache clear {sset['name']} --kind sliders" in line
    r = invoke("sliders", "list", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == [] and str(art.path) in r.stderr
    train = ["sliders", "a red circle", "-m", "tiny-sd", "--count", "2", "--samples", "2", "--steps", "2",
             "--train-steps", "2", "--encoder", "pixel", "--json"]
    assert str(art.path) in one_line_error(invoke(*train))  # never replaced without asking
    assert _json(invoke(*train, "--overwrite"))["name"] == sset["name"]
    art.manifest()


# ---------------------------------------------------------------- shards and tensor files


def test_a_garbled_shard_is_reported_and_recomputed(store_copy):
    art = _only("harvest")
    [shard] = art.path.glob("shard-*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one byte of tensor data: the header still reads
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedArtifactError, match="checksum"):
        harvest.load_harvest(art.path)
    assert invoke("cache", "verify").exit_code == 1
    r = invoke("harvest", "a red circle", *TINY, "--json")
    assert r.exit_code == 0 and "checksum" in r.stderr and json.loads(r.stdout)["computed"] == 2
    harvest.load_harvest(art.path)


def test_truncated_and_pickled_files_are_refused_from_their_header(tmp_path, monkeypatch):
    good = tmp_path / "good.safetensors"
    save_file({"x": torch.zeros(4, 4)}, str(good))
    assert read_header(good).tensors["x"].shape == (4, 4)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(BadTensorFile, match="truncated"):
        read_header(cut)
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"x": torch.zeros(4)}, pickled)

    def no_unpickling(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(BadTensorFile, match="pickle|zip"):
        read_header(pickled)


def test_shards_with_wrong_shapes_dtypes_or_pickles_make_the_harvest_damaged(store_copy):
    art = _only("harvest")
    [shard] = art.path.glob("shard-*.safetensors")
    good = shard.read_bytes()
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    wrong = [{**tensors, "seeds": torch.arange(3)}, {**tensors, "x0": tensors["x0"].float()},
             {k: v for k, v in tensors.items() if k != "final"}]
    for case in wrong:
        shard.unlink()
        save_file(case, str(shard))
        _edit_manifest(art, lambda m: {k: v for k, v in m.items() if k != "checksums"})  # the header check alone
        with pytest.raises(DamagedArtifactError, match=shard.name):
            harvest.load_harvest(art.path)
    torch.save(tensors, shard)
    with pytest.raises(DamagedArtifactError, match="never loaded"):
        harvest.load_harvest(art.path)
    shard.write_bytes(good)
    harvest.load_harvest(art.path)


def test_overlapping_shards_are_detected_and_refused_on_read(store_copy, tmp_path):
    assert harvest_shards.overlaps([(0, 8), (8, 16)]) == []
    assert harvest_shards.overlaps([(0, 8), (4, 12), (8, 16)]) == [((0, 8), (4, 12)), ((4, 12), (8, 16))]
    assert harvest_shards.disjoint([(0, 8), (0, 16), (8, 16)]) == ([(0, 8), (8, 16)], [(0, 16)])
    art = _only("harvest")
    [shard] = art.path.glob("shard-*.safetensors")
    shutil.copy(shard, art.path / harvest_shards.shard_name(1, 2))  # a second launch's shard over trajectory 1
    with pytest.raises(DamagedArtifactError, match="overlap"):
        harvest.load_harvest(art.path)
    r = invoke("harvest", "a red circle", *TINY, "--save-images", tmp_path / "images", "--json")
    assert r.exit_code == 0 and "overlaps" in r.stderr
    assert len(json.loads(r.stdout)["images"]) == 2 == len(list((tmp_path / "images").iterdir()))


# ---------------------------------------------------------------- links, leftovers, locks


def test_clear_removes_links_never_their_targets(store_copy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    art = _only("evaluate")
    (art.path / "link-dir").symlink_to(outside, target_is_directory=True)
    (art.path / "link-file").symlink_to(outside / "precious.txt")
    assert art.size() < 10_000_000 and "link" in " ".join(store_admin.verify("evaluate")[0].problems)
    linked = store.kind_dir("harvest") / "0123456789abcdef"
    linked.symlink_to(outside, target_is_directory=True)  # an artifact that is itself a link
    assert any(i.key == linked.name and i.damaged for i in store_admin.list_artifacts("harvest"))
    store_admin.clear(key=art.key)
    store_admin.clear(key=linked.name)
    assert (outside / "precious.txt").read_text() == "keep me" and not linked.exists() and not art.path.exists()


def test_leftovers_of_killed_writers_are_cleaned_when_no_one_holds_the_lock(store_copy):
    art = _only("harvest")
    orphan = art.path / ".shard-000000-000002.safetensors.k1ll3d.tmp"
    deleting = art.path.parent / f".deleting-{art.key}-99999"
    orphan.write_bytes(b"x" * 1000)
    listed = [i for i in store_admin.list_artifacts("harvest")][0]
    with art.lock():  # taking the lock sweeps what a killed writer left ...
        assert not orphan.exists()
        orphan.write_bytes(b"x" * 1000)  # ... but what a writer at work has in flight stays
        deleting.mkdir()
        (deleting / "f").write_bytes(b"y" * 500)
        assert store_admin.clean_leftovers() == 0 and orphan.exists() and deleting.exists()
    assert store_admin.clean_leftovers() == 1500 and not orphan.exists() and not deleting.exists()
    assert store_admin.list_artifacts("harvest")[0].size == listed.size - 1000
    assert _json(invoke("cache", "verify", "--json"))["damaged"] == []


def test_the_cleanup_of_set_a_spares_the_temp_folder_of_set_a_shape(tmp_path):
    from conceptkit.sliders.pipeline import _temporary_sets

    base = store.kind_dir("sliders")
    for name in (".tmp-a-123", ".tmp-a-shape-456", ".tmp-a-1-789"):
        (base / name).mkdir(parents=True)
    assert [p.name for p in _temporary_sets(store.artifact("sliders", "a"))] == [".tmp-a-123"]
    assert [p.name for p in _temporary_sets(store.artifact("sliders", "a-shape"))] == [".tmp-a-shape-456"]


def _hold(home, kind, key, started, seconds):
    os.environ["CONCEPTKIT_HOME"] = home
    with store.artifact(kind, key).lock():
        started.set()
        time.sleep(seconds)


def test_cache_clear_says_that_it_waits_and_for_whom(store_copy):
    art = _only("evaluate")
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    p = ctx.Process(target=_hold, args=(os.environ["CONCEPTKIT_HOME"], "evaluate", art.key, started, 1.0))
    p.start()
    assert started.wait(60)
    said = []
    store_admin.clear(key=art.key, on_wait=said.append)
    p.join(10)
    assert said and "waiting" in said[0] and f"process {p.pid}" in said[0] and not art.path.exists()


# ---------------------------------------------------------------- part 5: file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_keep_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        store.write_json(tmp_path / "a.json", {"x": 1})
        store.write_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
        (tmp_path / "plain.txt").write_text("plain")
    finally:
        os.umask(old)
    for name in ("a.json", "t.safetensors", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
