"""Harvest: every step's x0, cache hits, resume after an interruption, concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conceptkit import harvest, store
from conceptkit.diffusion import decode_batched
from conceptkit.models.load import load_model


@pytest.fixture(scope="module")
def tiny_sd():
    return load_model("tiny-sd")


def _cfg(**kw):
    base = dict(prompts=("a cat",), samples=6, steps=4, guidance=3.0, batch_size=2)
    return harvest.HarvestConfig(**{**base, **kw})


def test_records_every_step(tiny_sd):
    res = harvest.run(tiny_sd, _cfg())
    h = harvest.load_harvest(res.path)
    n, c = 6, tiny_sd.pipe.unet.config.in_channels
    assert h.x0.shape[:3] == (n, 4, c) and h.xt.shape == h.x0.shape
    assert h.final.shape == (n, *h.x0.shape[2:])
    assert h.timesteps.tolist() == tiny_sd.pipe.scheduler.timesteps.tolist()
    assert h.seeds.tolist() == list(range(6))
    assert res.manifest["samples"] == 6 and res.manifest["complete"]


def test_recorded_x0_is_the_models_prediction(tiny_sd):
    """Recompute one step's x0 from the UNet by hand and compare with what was recorded."""
    res = harvest.run(tiny_sd, _cfg(samples=2, store_dtype="float32"))
    h = harvest.load_harvest(res.path)
    pipe = tiny_sd.pipe
    step = 2
    t = int(h.timesteps[step])
    xt = h.xt[:, step]
    cond, uncond = pipe.encode_prompt(["a cat"] * 2, "cpu", 1, True)
    with torch.no_grad():
        eps = pipe.unet(torch.cat([xt, xt]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    e_u, e_c = eps.chunk(2)
    eps = e_u + 3.0 * (e_c - e_u)
    a = pipe.scheduler.alphas_cumprod[t]
    x0 = (xt - (1 - a).sqrt() * eps) / a.sqrt()
    assert torch.allclose(x0, h.x0[:, step], atol=1e-4)


def test_recording_does_not_change_the_images(tiny_sd):
    res = harvest.run(tiny_sd, _cfg(samples=2, store_dtype="float32"))
    h = harvest.load_harvest(res.path)
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(2)]
    plain = tiny_sd.pipe(["a cat"] * 2, num_inference_steps=4, guidance_scale=3.0, generator=gens, output_type="latent").images
    assert torch.equal(plain, h.final)


def test_second_call_is_a_cache_hit(tiny_sd):
    first = harvest.run(tiny_sd, _cfg())
    second = harvest.run(tiny_sd, _cfg(batch_size=3))  # batch size is not part of the key
    assert not first.cached and second.cached and second.computed == 0
    assert first.key == second.key
    fewer = harvest.run(tiny_sd, _cfg(samples=3))
    assert fewer.cached and fewer.key == first.key
    more = harvest.run(tiny_sd, _cfg(samples=8))
    assert more.computed == 2 and harvest.load_harvest(more.path).x0.shape[0] == 8


def test_key_depends_on_what_determines_the_samples(tiny_sd):
    keys = {harvest.harvest_key(tiny_sd, _cfg(**kw).resolved(tiny_sd)) for kw in ({}, {"steps": 5}, {"seed": 1}, {"prompts": ("a dog",)}, {"guidance": 2.0})}
    assert len(keys) == 5


def test_interrupted_harvest_resumes_to_identical_result(tiny_sd, tmp_path, monkeypatch):
    def stop_after_first_shard(done, total):
        if 0 < done < total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest.run(tiny_sd, _cfg(), progress=stop_after_first_shard)
    partial = harvest.shard_ranges(store.artifact("harvest", harvest.harvest_key(tiny_sd, _cfg().resolved(tiny_sd))).path)
    assert partial == [(0, 2)]
    resumed = harvest.run(tiny_sd, _cfg())
    assert resumed.computed == 4
    monkeypatch.setenv("CONCEPTKIT_HOME", str(tmp_path / "other"))
    clean = harvest.run(tiny_sd, _cfg())
    a, b = harvest.load_harvest(resumed.path), harvest.load_harvest(clean.path)
    assert resumed.key == clean.key
    for name in ("x0", "xt", "final", "seeds", "timesteps"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_prompts_cycle_over_trajectories(tiny_sd):
    res = harvest.run(tiny_sd, _cfg(prompts=("a cat", "a dog", "a bird"), samples=4))
    h = harvest.load_harvest(res.path)
    assert h.prompt_index.tolist() == [0, 1, 2, 0]


def test_tiny_sdxl_records_every_step():
    model = load_model("tiny-sdxl")
    res = harvest.run(model, _cfg(samples=4, steps=3))
    h = harvest.load_harvest(res.path)
    assert h.x0.shape[:2] == (4, 3) and len(res.manifest["timesteps"]) == 3


def test_keep_every_and_record_subset(tiny_sd):
    res = harvest.run(tiny_sd, _cfg(samples=2, steps=5, keep_every=2, record=("x0",)))
    h = harvest.load_harvest(res.path)
    assert h.xt is None and h.x0.shape[1] == 3  # steps 0, 2, 4
    assert h.timesteps.tolist() == tiny_sd.pipe.scheduler.timesteps.tolist()[::2]


def _cli(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "conceptkit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_sigkill_mid_harvest_then_rerun_matches_uninterrupted(tmp_path):
    args = ["harvest", "a cat", "--model", "tiny-sd", "--samples", "24", "--steps", "6", "--batch-size", "1", "--json"]
    home = os.environ["CONCEPTKIT_HOME"]
    proc = _cli(*args)
    shards: list[Path] = []
    while proc.poll() is None:
        shards = list(Path(home).glob("cache/harvest/*/shard-*.safetensors"))
        if shards:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert shards, proc.stderr.read()
    if len(shards) >= 24:
        pytest.skip("the harvest finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL
    rerun = _cli(*args)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    doc = json.loads(out)
    assert doc["available"] == 24 and 0 < doc["computed"] < 24
    assert not list(Path(doc["path"]).glob(".*tmp"))  # no half-written file survives
    clean = _cli(*args, env={"CONCEPTKIT_HOME": str(tmp_path / "clean")})
    cout, cerr = clean.communicate(timeout=300)
    assert clean.returncode == 0, cerr
    a, b = harvest.load_harvest(Path(doc["path"])), harvest.load_harvest(Path(json.loads(cout)["path"]))
    assert a.x0.shape[0] == 24 and torch.equal(a.x0, b.x0) and torch.equal(a.final, b.final)


def test_two_concurrent_harvests_make_one_artifact():
    args = ["harvest", "a dog", "--model", "tiny-sd", "--samples", "6", "--steps", "3", "--batch-size", "2", "--json"]
    procs = [_cli(*args), _cli(*args)]
    docs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        docs.append(json.loads(out))
    assert docs[0]["key"] == docs[1]["key"]
    assert sorted(d["computed"] for d in docs) == [0, 6]
    ranges = harvest.shard_ranges(Path(docs[0]["path"]))
    covered = [i for a, b in ranges for i in range(a, b)]
    assert sorted(covered) == list(range(6))  # nothing lost, nothing duplicated


def test_decoded_images_equal_the_pipelines(tiny_sd):
    res = harvest.run(tiny_sd, _cfg(samples=2, store_dtype="float32"))
    images = decode_batched(tiny_sd, harvest.load_harvest(res.path).final)
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(2)]
    plain = tiny_sd.pipe(["a cat"] * 2, num_inference_steps=4, guidance_scale=3.0, generator=gens, output_type="pt").images
    assert images.shape == plain.shape and torch.allclose(images, plain, atol=1e-5)
