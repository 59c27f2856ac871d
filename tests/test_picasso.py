"""Picasso: concept-neuron statistics and `conceptkit cluster` on tiny-sd.

The importance is Cones' closing estimate (checked against finite differences and against really
closing neurons); the JSON's metrics are recomputed from the saved arrays with scikit-learn; bad
input exits 2 with one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    calinski_harabasz_score,
    davies_bouldin_score,
    silhouette_score,
)
from typer.testing import CliRunner

from conceptkit.picasso import neurons as cn
from conceptkit import harvest
from conceptkit.picasso import cluster as picasso
from conceptkit.picasso import subconcepts
from conceptkit.picasso.attention import cross_attention_names
from conceptkit.cli import app
from conceptkit.errors import UsageError
from conceptkit.models.load import load_model
from _cli import one_line_error as _one_line_error

runner = CliRunner()
TINY = ["--model", "tiny-sd", "--steps", "4", "--samples", "4"]


def invoke(*args):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def tiny_sd():
    return load_model("tiny-sd")


# ---------------------------------------------------------------- importance


def test_grad_importance_is_the_first_order_cost_of_closing_a_neuron():
    model = load_model("tiny-sd")  # a private copy, cast to float64 so finite differences resolve
    model.pipe.unet.double()
    model = dataclasses.replace(model, dtype=torch.float64)
    unet, sched = model.pipe.unet, model.pipe.scheduler
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    emb = model.pipe.encode_prompt(prompt=["a red circle"] * 2, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0].double()
    t = 500
    imp = cn.step_statistics(model, refs, noise, t, emb, {}, torch.ones(2, emb.shape[1]), "grad", batch_size=1)["importance"].double()

    def loss() -> float:
        tt = torch.full((2,), t)
        with torch.no_grad():
            return F.mse_loss(unet(sched.add_noise(refs, noise, tt), tt, encoder_hidden_states=emb).sample, noise).item()

    rows = [(lin, r) for name in cross_attention_names(unet) for lin in (unet.get_submodule(name).to_k, unet.get_submodule(name).to_v)
            for r in range(lin.weight.shape[0])]
    assert len(rows) == len(imp)
    base = loss()
    order = np.argsort(-imp.abs().numpy())
    for n in [*order[:3], order[len(order) // 2]]:
        lin, r = rows[int(n)]
        w = lin.weight.data[r].clone()
        lin.weight.data[r] = w * (1 + 1e-4)
        up = loss()
        lin.weight.data[r] = w * (1 - 1e-4)
        down = loss()
        lin.weight.data[r] = 0.0
        closed = loss()
        lin.weight.data[r] = w
        slope = (up - down) / 2e-4  # dL/d(scale of row n) = sum_j W_nj dL/dW_nj
        assert -slope == pytest.approx(imp[n].item(), rel=1e-4)
        if n in order[:3]:  # the strongest neurons: closing them really changes the loss by about the estimate
            assert closed - base == pytest.approx(imp[n].item(), rel=0.3)


def test_activation_importance_and_concept_tokens(tiny_sd):
    res = harvest.run(tiny_sd, harvest.HarvestConfig(prompts=("a red circle",), samples=2, steps=2))
    stats = cn.run(tiny_sd, res.path, cn.NeuronConfig(importance="activation", concept="circle")).stats
    assert np.allclose(stats.importance, stats.activation)
    assert stats.manifest["concept_tokens"] == [["circle</w>"]]
    assert stats.importance.shape == (2, stats.n_neurons) and len(stats.maps(0)) == len(stats.blocks)
    whole = cn.run(tiny_sd, res.path, cn.NeuronConfig(importance="activation")).stats
    assert whole.manifest["concept_tokens"] == [["a</w>", "red</w>", "circle</w>"]]
    assert whole.key != stats.key and not np.allclose(whole.activation, stats.activation)
    pooled = cn.run(tiny_sd, res.path, cn.NeuronConfig(importance="activation", fs_size=4)).stats
    assert all(m.shape[1:] == (4, 4) for m in pooled.maps(0)) and whole.maps(0)[0].shape[1:] == (8, 8)
    assert np.allclose(pooled.maps(0)[1].mean((1, 2)), whole.maps(0)[1].mean((1, 2)), atol=1e-3)  # average pooling keeps the mean


def test_neuron_statistics_are_cached_and_resume_per_timestep(tiny_sd):
    res = harvest.run(tiny_sd, harvest.HarvestConfig(prompts=("a cat",), samples=2, steps=3))
    first = cn.run(tiny_sd, res.path, cn.NeuronConfig())
    assert not first.cached
    (first.path / "step-0001.safetensors").unlink()
    calls = []
    again = cn.run(tiny_sd, res.path, cn.NeuronConfig(), progress=lambda d, t: calls.append(d))
    assert again.key == first.key and calls == [2, 3]  # only the missing step was computed
    assert np.allclose(again.stats.importance, first.stats.importance)
    assert cn.run(tiny_sd, res.path, cn.NeuronConfig()).cached
    (first.path / "manifest.json").unlink()  # interrupted after the last step, before the manifest
    healed = cn.run(tiny_sd, res.path, cn.NeuronConfig())
    assert healed.cached and healed.stats.manifest["blocks"] == first.stats.manifest["blocks"]


def test_reference_images_are_used(tiny_sd, tmp_path):
    from PIL import Image

    folder = tmp_path / "refs"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 40), colour).save(folder / f"{i}.png")
    res = harvest.run(tiny_sd, harvest.HarvestConfig(prompts=("a red circle",), samples=2, steps=2))
    own = cn.run(tiny_sd, res.path, cn.NeuronConfig())
    theirs = cn.run(tiny_sd, res.path, cn.NeuronConfig(reference_images=str(folder)))
    assert theirs.key != own.key and theirs.stats.manifest["reference"]["images"] == str(folder.resolve())
    assert not np.allclose(theirs.stats.importance, own.stats.importance)


# ---------------------------------------------------------------- the cluster command


def test_cluster_json_metrics_recompute_from_saved_arrays_and_sweeps_plot(tmp_path):
    plots = tmp_path / "plots"
    r = invoke("cluster", "a red circle", *TINY, "--tau", "0.8", "--k", "3", "--sweep-k", "2:4", "--sweep-tau", "0.5:0.9:3",
               "--sweep-temporal-dim", "1:3", "--plots", str(plots), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # stdout holds the JSON document and nothing else
    for field in ("key", "tau", "k", "temporal_dim", "n_neurons_kept", "metrics", "arrays", "clusters"):
        assert field in doc
    assert (doc["tau"], doc["k"], doc["temporal_dim"]) == (0.8, 3, 3)
    x = np.load(doc["arrays"]["features"])
    labels = np.load(doc["arrays"]["labels"])
    u = np.load(doc["arrays"]["membership"])
    assert x.shape[0] == labels.shape[0] == u.shape[1] == doc["n_neurons_kept"] and u.shape[0] == 3
    assert np.array_equal(labels, u.argmax(0))
    m = doc["metrics"]
    assert abs(m["calinski_harabasz"] - calinski_harabasz_score(x, labels)) < 1e-6
    assert abs(m["davies_bouldin"] - davies_bouldin_score(x, labels)) < 1e-6
    assert abs(m["silhouette"] - silhouette_score(x, labels)) < 1e-6
    assert abs(m["fpc"] - float(np.sum(u**2) / u.shape[1])) < 1e-6
    assert m["seconds"] > 0
    assert sum(c["size"] for c in doc["clusters"]) == doc["n_neurons_kept"]
    # the tau-quantile filter keeps about a (1 - tau) share per timestep group
    assert doc["n_neurons_kept"] == pytest.approx(0.2 * doc["n_neurons"] * 3, rel=0.05)
    for name in ("centre_maps", "segmentation", "similarity"):
        assert Path(doc["images"][name]).read_bytes()[:4] == b"\x89PNG"
    sim = np.load(doc["arrays"]["similarity_cluster_correlation"])
    t = len(doc["timesteps"])
    assert sim.shape == (3, t, t) and np.allclose(np.diagonal(sim, axis1=1, axis2=2), 1)
    # sweeps: one table each, refits that agree with the main fit, PNG plots
    sw = doc["sweeps"]
    assert [p["value"] for p in sw["k"]] == [2, 3, 4] and len(sw["tau"]) == 3 and [p["value"] for p in sw["temporal_dim"]] == [1, 2, 3]
    at3 = next(p for p in sw["k"] if p["value"] == 3)["metrics"]
    assert at3["silhouette"] == pytest.approx(m["silhouette"], abs=1e-9)
    kept = [p["n_neurons_kept"] for p in sw["tau"]]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]  # a higher tau keeps fewer neurons
    assert [p["n_neurons_kept"] for p in sw["temporal_dim"]] == sorted(p["n_neurons_kept"] for p in sw["temporal_dim"])
    for name in ("k", "tau", "temporal_dim"):
        assert (plots / f"sweep-{name}.png").read_bytes()[:4] == b"\x89PNG"
    # the same harvest by key, without --json: tables on stderr, nothing on stdout, the same clustering
    table = invoke("cluster", "--harvest", doc["harvest"], "--tau", "0.8", "--k", "3", "--sweep-k", "2:3")
    assert table.exit_code == 0 and table.stdout == ""
    assert "sweep over k" in table.stderr and "silhouette" in table.stderr and doc["key"] in table.stderr




@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--tau", "1.0"], "--tau"),
        (["--tau", "-0.1"], "--tau"),
        (["--k", "1"], "--k"),
        (["--k", "100000"], "--k must be between 2 and 256"),
        (["--concept", "dog"], "'dog' is not in the prompt"),
        (["--temporal-dim", "0"], "--temporal-dim"),
        (["--tau-mode", "median"], "--tau-mode"),
        (["--importance", "magic"], "--importance"),
        (["--sweep-k", "8:2"], "--sweep-k"),
        (["--fuzziness", "1"], "--fuzziness"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(extra, fragment):
    line = _one_line_error(invoke("cluster", "a red circle", *TINY, *extra, "--json"))
    assert fragment in line


def test_a_harvest_without_what_is_needed_is_refused():
    line = _one_line_error(invoke("cluster", "--harvest", "feedbeef", "--json"))
    assert "feedbeef" in line
    one_step = json.loads(invoke("harvest", "a cat", "--model", "tiny-sd", "--samples", "2", "--steps", "1", "--json").stdout)
    assert "--temporal-dim" in _one_line_error(invoke("cluster", "--harvest", one_step["key"], "--json"))
    assert "PROMPT" in _one_line_error(invoke("cluster", "--json"))


# ---------------------------------------------------------------- sub-concept editing


def test_closing_a_subconcept_equals_zeroing_its_weight_rows(tiny_sd):
    doc = json.loads(invoke("cluster", "a red circle", *TINY, "--k", "3", "--temporal-dim", "1", "--json").stdout)
    sub = subconcepts.load_map(doc["key"])
    pipe = tiny_sd.pipe

    def image():
        return pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(1), output_type="pt").images

    base = image()
    with subconcepts.apply(pipe.unet, sub.blocks, subconcepts.gates(sub, 0, "close")):
        closed = image()
    with subconcepts.apply(pipe.unet, sub.blocks, subconcepts.gates(sub, 0, "scale", scale=1.0)):
        assert torch.equal(image(), base)  # a gate of 1 changes nothing
    assert torch.equal(image(), base)  # the hooks are gone
    assert (closed - base).abs().max() > 1e-4
    # with D = 1 the cluster's neurons are closed at every step: the same as zeroing their rows
    ids = sub.item_neuron[sub.labels == 0]
    saved = {}
    for b in sub.blocks:
        lin = getattr(pipe.unet.get_submodule(b["layer"]), f"to_{b['proj']}")
        rows = ids[(ids >= b["start"]) & (ids < b["stop"])] - b["start"]
        if len(rows):
            saved[lin] = lin.weight.data.clone()
            lin.weight.data[torch.as_tensor(rows)] = 0.0
    try:
        zeroed = image()
    finally:
        for lin, w in saved.items():
            lin.weight.data = w
    assert saved and torch.allclose(zeroed, closed, atol=1e-6)
    with pytest.raises(UsageError):
        subconcepts.gates(sub, 3)


# ---------------------------------------------------------------- pure parts


def test_parse_range_and_config_checks():
    assert picasso.parse_range("2:5", "k", integer=True) == [2, 3, 4, 5]
    assert picasso.parse_range("0.5:0.9:5", "tau", integer=False) == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert picasso.parse_range("3", "k", integer=True) == [3]
    for bad in ("a:b", "5:2", "0.1:0.5"):
        with pytest.raises(UsageError):
            picasso.parse_range(bad, "tau", integer=False)
    with pytest.raises(UsageError):
        picasso.ClusterConfig(tau=0.95, tau_mode="relative", k=2, pca_dim=0)
    assert picasso.ClusterConfig(tau=5.0, tau_mode="absolute").tau == 5.0


def test_a_cluster_killed_while_drawing_its_figures_leaves_no_partial_artifact(monkeypatch):
    """Arrays, figures and manifest are one artifact: a kill before the end leaves nothing half-written."""
    import os
    from pathlib import Path

    from conceptkit import store
    from conceptkit.picasso import plots as picasso_plots

    real = picasso_plots.similarity_figure

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(picasso_plots, "similarity_figure", killed)
    r = invoke("cluster", "a red circle", *TINY, "--k", "3", "--temporal-dim", "1", "--json")
    assert r.exit_code == 130, r.output
    base = store.kind_dir("cluster")
    assert not [p.name for p in base.iterdir() if not p.name.endswith(".lock")] if base.exists() else True, list(base.iterdir())  # no artifact, no temporary folder
    monkeypatch.setattr(picasso_plots, "similarity_figure", real)
    doc = json.loads(invoke("cluster", "a red circle", *TINY, "--k", "3", "--temporal-dim", "1", "--json").stdout)
    folder = Path(doc["path"])
    assert sorted(p.name for p in folder.glob("*.png")) == ["centre_maps.png", "segmentation.png", "similarity.png"]
    assert all(Path(p).is_file() and Path(p).parent == folder for p in doc["images"].values())
    assert json.loads((folder / "manifest.json").read_text())["images"] == doc["images"]
    assert not [p for p in base.iterdir() if p.name.startswith(".tmp") or p.name.startswith(".old")]
    assert os.path.samefile(folder.parent, base)


@pytest.mark.slow
def test_cluster_killed_with_sigkill_at_random_points_ends_like_an_uninterrupted_run(tmp_path):
    """Real SIGKILLs during harvest, neuron statistics, clustering and the final write; the rerun's
    arrays and figures equal an uninterrupted run's, and no partial artifact is ever listed."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import numpy as np

    args = [sys.executable, "-m", "conceptkit", "cluster", "a red circle", *TINY, "--k", "3", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    clean = subprocess.run(args, env={**env, "CONCEPTKIT_HOME": str(tmp_path / "clean")}, capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, clean.stderr
    full = time.monotonic() - start
    rng = random.Random(1)
    killed_home = tmp_path / "killed"
    for _ in range(4):
        proc = subprocess.Popen(args, env={**env, "CONCEPTKIT_HOME": str(killed_home)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.3, 1.0) * full)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for folder in (killed_home / "cache" / "cluster").glob("*") if (killed_home / "cache" / "cluster").exists() else []:
            if folder.is_dir() and not folder.name.startswith("."):  # a listed artifact is always whole
                assert (folder / "manifest.json").is_file() and len(list(folder.glob("*.png"))) == 3
    final = subprocess.run(args, env={**env, "CONCEPTKIT_HOME": str(killed_home)}, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr
    a, b = json.loads(clean.stdout), json.loads(final.stdout)
    assert a["key"] == b["key"]
    for name in ("labels", "membership", "centre_maps"):
        assert np.allclose(np.load(a["arrays"][name]), np.load(b["arrays"][name]), atol=1e-5), name
    assert sorted(Path(p).name for p in b["images"].values()) == ["centre_maps.png", "segmentation.png", "similarity.png"]
