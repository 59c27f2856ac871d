"""Picasso sub-concepts as images: the gates on the UNet, `generate --subconcept`, `subconcepts.render`,
and textual-inversion input to `cluster` (`--embedding/--token`).

The hook tests build a sub-concept map by hand on tiny-sd's UNet and compare the gated projection
outputs and UNet outputs with the ungated ones at timesteps of each group."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from conceptkit.picasso import subconcepts
from conceptkit.models import textual_inversion
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


def _blocks(unet) -> list[dict]:
    """The neurons artifact's block layout: every attn2 layer's to_k then to_v, in forward order."""
    blocks, start = [], 0
    for name in cross_attention_names(unet):
        for proj in ("k", "v"):
            c = getattr(unet.get_submodule(name), f"to_{proj}").out_features
            blocks.append({"layer": name, "proj": proj, "start": start, "stop": start + c})
            start += c
    return blocks


def _map(unet, items: list[tuple[int, int, int]], k: int = 2, d: int = 3) -> subconcepts.SubconceptMap:
    """A sub-concept map from (group, neuron, label) items."""
    g, n, lab = (np.array(x) for x in zip(*items, strict=True))
    return subconcepts.SubconceptMap("hand", k, d, 1000, _blocks(unet), g, n, lab)


def _unet_inputs(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    emb = model.pipe.encode_prompt(prompt=["a red circle"] * 2, device="cpu", num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)[0]
    return x, emb


@torch.no_grad()
def _outputs(model, x, emb, t, record=()):
    """UNet output at timestep t and the recorded outputs of the given projections (hooked after any gates)."""
    seen, handles = {}, []
    for lin in record:
        handles.append(lin.register_forward_hook(lambda m, a, out, lin=lin: seen.__setitem__(lin, out.clone())))
    try:
        out = model.pipe.unet(x, torch.tensor(t), encoder_hidden_states=emb).sample
    finally:
        for h in handles:
            h.remove()
    return out, seen


# ---------------------------------------------------------------- the gates


def test_gates_change_the_unet_only_in_their_timestep_groups(tiny_sd):
    unet = tiny_sd.pipe.unet
    blocks = _blocks(unet)
    v0 = blocks[1]  # the first layer's to_v
    # sub-concept 0: eight value neurons, concept neurons in group 1 only (t in [334, 666] with D = 3)
    sub = _map(unet, [(1, v0["start"] + i, 0) for i in range(8)] + [(0, v0["start"] + 20, 1)])
    x, emb = _unet_inputs(tiny_sd)
    base = {t: _outputs(tiny_sd, x, emb, t)[0] for t in (100, 500, 900)}
    with subconcepts.apply(unet, sub.blocks, subconcepts.gates(sub, 0, "close")):
        gated = {t: _outputs(tiny_sd, x, emb, t)[0] for t in (100, 500, 900)}
    assert torch.equal(gated[100], base[100]) and torch.equal(gated[900], base[900])  # groups 0 and 2: untouched
    assert (gated[500] - base[500]).abs().max() > 1e-4  # group 1: the eight neurons are closed
    assert torch.equal(_outputs(tiny_sd, x, emb, 500)[0], base[500])  # the hooks are gone


def test_closing_every_neuron_of_a_block_zeroes_its_output(tiny_sd):
    unet = tiny_sd.pipe.unet
    blocks = _blocks(unet)
    b, other = blocks[3], blocks[2]  # the second layer's to_v, and its to_k
    lin = getattr(unet.get_submodule(b["layer"]), "to_v")
    lin_other = getattr(unet.get_submodule(other["layer"]), "to_k")
    sub = _map(unet, [(g, n, 0) for g in range(3) for n in range(b["start"], b["stop"])] + [(0, other["start"], 1)])
    x, emb = _unet_inputs(tiny_sd)
    _, before = _outputs(tiny_sd, x, emb, 500, record=(lin, lin_other))
    with subconcepts.apply(unet, sub.blocks, subconcepts.gates(sub, 0, "close")):
        for t in (10, 500, 990):
            _, seen = _outputs(tiny_sd, x, emb, t, record=(lin, lin_other))
            assert before[lin].abs().max() > 0 and torch.count_nonzero(seen[lin]) == 0
            if t == 500:
                assert torch.equal(seen[lin_other], before[lin_other])  # another block is left alone


def test_only_keeps_the_clusters_neurons_and_scale_multiplies_them(tiny_sd):
    unet = tiny_sd.pipe.unet
    b = _blocks(unet)[0]  # the first layer's to_k
    lin = unet.get_submodule(b["layer"]).to_k
    mine, theirs, unkept = [b["start"] + i for i in (0, 1, 2)], [b["start"] + i for i in (3, 4)], b["start"] + 5
    sub = _map(unet, [(1, n, 0) for n in mine] + [(1, n, 1) for n in theirs] + [(0, mine[0], 1)])
    x, emb = _unet_inputs(tiny_sd)
    _, base = _outputs(tiny_sd, x, emb, 500, record=(lin,))
    ch = lambda ids: [i - b["start"] for i in ids]  # noqa: E731
    with subconcepts.apply(unet, sub.blocks, subconcepts.gates(sub, 0, "only")):
        _, only = _outputs(tiny_sd, x, emb, 500, record=(lin,))
        _, only_g0 = _outputs(tiny_sd, x, emb, 100, record=(lin,))
    assert torch.equal(only[lin][..., ch(mine)], base[lin][..., ch(mine)])  # the cluster's neurons kept
    assert torch.count_nonzero(only[lin][..., ch(theirs)]) == 0  # the other cluster's closed
    assert torch.equal(only[lin][..., ch([unkept])], base[lin][..., ch([unkept])])  # neurons no cluster kept: untouched
    # in group 0, neuron mine[0] belongs to the other cluster: closed there
    _, base_g0 = _outputs(tiny_sd, x, emb, 100, record=(lin,))
    assert torch.count_nonzero(only_g0[lin][..., ch(mine[:1])]) == 0
    assert torch.equal(only_g0[lin][..., ch(mine[1:])], base_g0[lin][..., ch(mine[1:])])
    with subconcepts.apply(unet, sub.blocks, subconcepts.gates(sub, 0, "scale", scale=2.0)):
        _, doubled = _outputs(tiny_sd, x, emb, 500, record=(lin,))
    assert torch.allclose(doubled[lin][..., ch(mine)], 2 * base[lin][..., ch(mine)])
    assert torch.equal(doubled[lin][..., ch(theirs)], base[lin][..., ch(theirs)])


def test_modification_protocol_installs_and_removes(tiny_sd):
    unet = tiny_sd.pipe.unet
    b = _blocks(unet)[1]
    sub = _map(unet, [(g, b["start"] + i, 0) for g in range(3) for i in range(16)] + [(0, b["start"] + 30, 1)])
    x, emb = _unet_inputs(tiny_sd)
    base = _outputs(tiny_sd, x, emb, 500)[0]
    mod = subconcepts.SubconceptModification(unet, sub, 0, "close")
    mod.set_step(0, 4)
    assert (_outputs(tiny_sd, x, emb, 500)[0] - base).abs().max() > 1e-4
    mod.remove()
    mod.remove()  # twice is harmless
    assert torch.equal(_outputs(tiny_sd, x, emb, 500)[0], base)
    d = mod.describe()
    assert (d["kind"], d["cluster_key"], d["subconcept"], d["mode"], d["size"]) == ("subconcept", "hand", 0, "close", 48)
    with pytest.raises(UsageError):
        subconcepts.SubconceptModification(unet, sub, 2, "close")
    assert torch.equal(_outputs(tiny_sd, x, emb, 500)[0], base)  # a refused sub-concept leaves no hook behind


def test_parse_spec():
    assert subconcepts.parse_spec("3f2a:1") == subconcepts.SubconceptSpec("3f2a", 1, subconcepts.DEFAULT_MODE, 0.0)
    assert subconcepts.parse_spec("3f2a:0:close") == subconcepts.SubconceptSpec("3f2a", 0, "close", 0.0)
    assert subconcepts.parse_spec(" 3f2a:2:scale:-1.5 ").scale == -1.5
    assert str(subconcepts.parse_spec("3f2a:2:scale:2")) == "3f2a:2:scale:2"
    for bad, fragment in [("3f2a", "malformed"), ("3f2a:x", "C must be"), ("3f2a:0:blur", "unknown mode"),
                          ("3f2a:0:scale", "needs a SCALE"), ("3f2a:0:close:2", "mode scale only"), ("3f2a:0:scale:inf", "finite"),
                          ("3f2a:-1", "0 or more"), ("a/b:0", "malformed"), ("3f2a:0:scale:x", "number")]:
        with pytest.raises(UsageError, match=fragment):
            subconcepts.parse_spec(bad)


# ---------------------------------------------------------------- generate --subconcept and render


@pytest.fixture(scope="module")
def tiny_cluster(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("sub-home")
    old = os.environ.get("CONCEPTKIT_HOME")
    os.environ["CONCEPTKIT_HOME"] = str(home)
    try:
        r = invoke("cluster", "a red circle", *TINY, "--k", "3", "--tau", "0.8", "--json")
        assert r.exit_code == 0, r.output
    finally:
        if old is None:
            os.environ.pop("CONCEPTKIT_HOME")
        else:
            os.environ["CONCEPTKIT_HOME"] = old
    return home, json.loads(r.stdout)


@pytest.fixture
def in_cluster_home(tiny_cluster, monkeypatch):
    home, doc = tiny_cluster
    monkeypatch.setenv("CONCEPTKIT_HOME", str(home))
    return doc


def test_generate_subconcept_records_its_settings_and_changes_the_image(in_cluster_home, tmp_path):
    key = in_cluster_home["key"]
    common = ["--model", "tiny-sd", "--steps", "4", "-n", "2", "--json"]
    plain = json.loads(invoke("generate", "a red circle", *common, "--out", str(tmp_path / "plain")).stdout)
    c = int(np.argmax([cl["size"] for cl in in_cluster_home["clusters"]]))
    r = invoke("generate", "a red circle", *common, "--out", str(tmp_path / "sub"), "--subconcept", f"{key[:6]}:{c}:close")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [f["subconcepts"] for f in doc["files"]] == [[f"{key[:6]}:{c}:close"]] * 2
    png = Image.open(doc["files"][0]["path"])
    settings = json.loads(png.text["conceptkit"])
    mod = settings["modifications"][0]
    assert (mod["kind"], mod["cluster_key"], mod["subconcept"], mod["mode"]) == ("subconcept", key, c, "close")
    assert "Sub-concepts:" in png.text["parameters"]
    a = np.asarray(Image.open(plain["files"][0]["path"]), dtype=float)
    b = np.asarray(png, dtype=float)
    assert np.abs(a - b).max() > 0  # closing a sub-concept changes the image


def test_subconcept_grid_is_one_png_with_a_row_per_subconcept(in_cluster_home, tmp_path, tiny_sd):
    key = in_cluster_home["key"]
    r = invoke("generate", "a red circle", "--model", "tiny-sd", "--steps", "4", "-n", "3", "--json",
               "--out", str(tmp_path), "--subconcept-grid", f"{key[:6]}:close")
    assert r.exit_code == 0, r.output
    (f,) = json.loads(r.stdout)["files"]
    grid = f["subconcept_grid"]
    assert grid["key"] == key and grid["mode"] == "close" and len(grid["rows"]) == grid["k"] + 1
    png = Image.open(f["path"])
    assert json.loads(png.text["conceptkit"])["subconcept_grid"] == grid
    assert png.size == (3 * 34 + 2, (grid["k"] + 1) * 34 + 2)  # 32-pixel tiny-sd images, 2-pixel padding
    from conceptkit.diffusion import sample

    # row 0 is the unmodified model, row 1 sub-concept 0 in mode close, a column per seed
    cells = np.asarray(png, dtype=float)
    base = sample(tiny_sd, "a red circle", [0, 1, 2], 4, tiny_sd.default_guidance)
    sub0 = subconcepts.render(tiny_sd, key, 0, [0, 1, 2], mode="close", steps=4, prompt="a red circle")
    for row, images in ((0, base), (1, sub0)):
        for col in range(3):
            want = (images[col].permute(1, 2, 0).numpy() * 255).round()
            got = cells[2 + row * 34: 2 + row * 34 + 32, 2 + col * 34: 2 + col * 34 + 32]
            assert np.abs(got - want).max() <= 1, (row, col)
    bad = invoke("generate", "a red circle", "--model", "tiny-sd", "--subconcept-grid", f"{key[:6]}:close",
                 "--slider", "0=1")
    assert bad.exit_code == 2 and "alone" in bad.output


def test_render_draws_each_mode_from_the_harvest_prompt(in_cluster_home, tiny_sd):
    sub = subconcepts.load_map(in_cluster_home["key"])
    assert sub.prompts == ("a red circle",) and sum(sub.sizes()) == in_cluster_home["n_neurons_kept"]
    c = int(np.argmax(sub.sizes()))  # FCM may leave a sub-concept of the random tiny model empty
    only = subconcepts.render(tiny_sd, sub, c, [0, 1], steps=4, batch_size=1)
    assert only.shape[:2] == (2, 3) and only.min() >= 0 and only.max() <= 1
    assert torch.allclose(subconcepts.render(tiny_sd, sub.key, c, [0, 1], steps=4), only, atol=1e-5)  # key or map, any batch size
    close = subconcepts.render(tiny_sd, sub, c, [0, 1], mode="close", steps=4)
    unit = subconcepts.render(tiny_sd, sub, c, [0, 1], mode="scale", scale=1.0, steps=4)
    from conceptkit.diffusion import sample

    base = sample(tiny_sd, "a red circle", [0, 1], 4, tiny_sd.default_guidance)
    assert torch.equal(unit, base) and not torch.equal(close, base) and not torch.equal(only, close)
    with pytest.raises(UsageError, match="does not exist"):
        subconcepts.render(tiny_sd, sub, 3, [0])


def test_vbsc_scores_subconcepts_against_random_groups_of_the_same_sizes(in_cluster_home, tiny_sd):
    from conceptkit.evaluate import vbsc as picasso_eval

    sub = subconcepts.load_map(in_cluster_home["key"])
    shuffled = picasso_eval.permuted(sub, 0)
    assert shuffled.sizes() == sub.sizes() and not np.array_equal(shuffled.labels, sub.labels)
    assert np.array_equal(shuffled.item_neuron, sub.item_neuron)  # the same kept items, regrouped
    cfg = picasso_eval.VbscConfig(images=2, draws=2, modes=("close", "only"), encoder="pixel", steps=2)
    calls = []
    res = picasso_eval.vbsc(tiny_sd, sub, cfg, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (2 * 3 * 3, 2 * 3 * 3) and res.base is None  # no analyser off the toy
    assert [m.mode for m in res.modes] == ["close", "only"]
    for m in res.modes:
        assert len(m.random) == len(m.diff_random) == 2
        assert all(v is not None and np.isfinite(v) for v in m.scores.values())
        assert m.scores != m.random[0]
    doc = json.loads(json.dumps(picasso_eval.to_dict(res)))
    assert set(doc["modes"]["close"]["random"]) == {"calinski_harabasz", "davies_bouldin", "silhouette"}
    with pytest.raises(UsageError):
        picasso_eval.VbscConfig(modes=("scale",))


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("feedbeef:0", "no cluster artifact 'feedbeef'"),
        ("{key}:7", "sub-concept 7 does not exist"),
        ("{key}:0:blur", "unknown mode"),
        ("{key}", "malformed"),
        ("{key}:0:scale", "needs a SCALE"),
    ],
)
def test_generate_subconcept_bad_input_is_one_line_and_exit_2(in_cluster_home, spec, fragment, tmp_path):
    spec = spec.format(key=in_cluster_home["key"])
    line = _one_line_error(invoke("generate", "a red circle", "--model", "tiny-sd", "--steps", "2", "-n", "1",
                                  "--out", str(tmp_path), "--subconcept", spec, "--json"))
    assert fragment in line
    assert not list(tmp_path.iterdir())  # nothing drawn


def test_a_cluster_of_another_model_is_refused(in_cluster_home, tmp_path):
    line = _one_line_error(invoke("generate", "a red circle", "--model", "tiny-sdxl", "--steps", "2", "-n", "1",
                                  "--out", str(tmp_path), "--subconcept", f"{in_cluster_home['key']}:0", "--json"))
    assert "was made on tiny-sd" in line


# ---------------------------------------------------------------- textual inversion


TOY_SMALL = ["--model", "toy", "--samples", "2", "--steps", "3", "--k", "2", "--tau", "0.8", "--json"]


def _circle_embedding(path, token="<tok>", width=None):
    model = load_model("toy")
    tok, enc = model.pipe.tokenizer, model.pipe.text_encoder
    vec = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("circle</w>")].detach().clone()
    if width is not None:
        vec = torch.cat([vec, vec])[:width]
    save_file({token: vec.contiguous()}, str(path))
    return path


def test_an_embedding_copy_of_a_word_gives_that_words_clusters(tmp_path):
    emb = _circle_embedding(tmp_path / "circle.safetensors")
    word = invoke("cluster", "a red circle", *TOY_SMALL, "--concept", "circle")
    learned = invoke("cluster", "a red <tok>", *TOY_SMALL, "--embedding", str(emb), "--token", "<tok>", "--concept", "<tok>")
    assert word.exit_code == 0 and learned.exit_code == 0, learned.output
    a, b = json.loads(word.stdout), json.loads(learned.stdout)
    assert b["concept_tokens"] == [["<tok>"]] and b["embedding"]["token"] == "<tok>"
    assert a["harvest"] != b["harvest"]  # the embedding is part of the model's identity: nothing is shared
    for name in ("features", "labels", "membership"):
        assert np.allclose(np.load(a["arrays"][name]), np.load(b["arrays"][name]), atol=1e-5), name
    for m in ("calinski_harabasz", "davies_bouldin", "silhouette", "fpc"):
        assert a["metrics"][m] == pytest.approx(b["metrics"][m], rel=1e-5)
    # its sub-concepts render only with the embedding loaded
    gen = ["generate", "a red <tok>", "--subconcept", f"{b['key']}:0", "-n", "1", "--steps", "2", "--out", str(tmp_path / "g"), "--json"]
    assert "--embedding" in _one_line_error(invoke(*gen))
    assert invoke(*gen, "--embedding", str(emb), "--token", "<tok>").exit_code == 0


def test_bad_embeddings_are_one_line_and_exit_2(tmp_path):
    wrong = _circle_embedding(tmp_path / "wide.safetensors", width=48)
    pickled = tmp_path / "learned_embeds.bin"
    torch.save({"<tok>": torch.zeros(64)}, pickled)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not a safetensors file")
    two = tmp_path / "two.safetensors"
    save_file({"<a>": torch.zeros(64), "<b>": torch.zeros(64)}, str(two))
    cases = [
        (["a red <tok>", "--embedding", str(wrong), "--token", "<tok>"], "width 48"),
        (["a red <tok>", "--embedding", str(pickled), "--token", "<tok>"], "not a .safetensors file"),
        (["a red <tok>", "--embedding", str(fake), "--token", "<tok>"], "not a readable safetensors file"),
        (["a red <tok>", "--embedding", str(two), "--token", "<tok>"], "none of them '<tok>'"),
        (["a red <tok>", "--embedding", str(wrong)], "--embedding needs --token"),
        (["a red <tok>", "--token", "<tok>"], "--token needs --embedding"),
        (["a red circle", "--embedding", str(wrong), "--token", "<tok>"], "is not in the prompt"),
        (["a red <tok>", "--embedding", str(tmp_path / "none.safetensors"), "--token", "<tok>"], "no such file"),
    ]
    for args, fragment in cases:
        assert fragment in _one_line_error(invoke("cluster", *args, *TOY_SMALL)), args
    same = _circle_embedding(tmp_path / "c.safetensors", token="circle")
    line = _one_line_error(invoke("cluster", "a red circle", *TOY_SMALL, "--embedding", str(same), "--token", "circle"))
    assert "already a word" in line


def test_read_embedding_layouts(tmp_path):
    save_file({"emb_params": torch.ones(1, 8)}, str(tmp_path / "a1111.safetensors"))
    assert torch.equal(textual_inversion.read_embedding(tmp_path / "a1111.safetensors", "<x>"), torch.ones(8))
    save_file({"emb_params": torch.ones(2, 8)}, str(tmp_path / "multi.safetensors"))
    with pytest.raises(UsageError, match="single-vector"):
        textual_inversion.read_embedding(tmp_path / "multi.safetensors", "<x>")
