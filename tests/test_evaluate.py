"""`conceptkit evaluate`: every number in --json recomputed from the saved arrays independently; reports; bad input."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from PIL import Image
from typer.testing import CliRunner

from conceptkit import store
from conceptkit.cli import app
from _cli import one_line_error as _one_line_error

runner = CliRunner()
TOL = dict(abs=1e-6, rel=1e-6)




def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stdout holds the document and nothing else


def _arrays(doc) -> dict[str, np.ndarray]:
    return {name: np.load(path, allow_pickle=False) for name, path in doc["arrays"].items()}


# ---------------------------------------------------------------- independent computations


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def diversity(x) -> float:
    """Mean over unordered pairs of 1 - cosine, from the Gram matrix (not scipy's pdist)."""
    g = _unit(x) @ _unit(x).T
    iu = np.triu_indices(len(g), 1)
    return float(np.mean(1 - g[iu]))


def vendi(x) -> float:
    """exp(entropy) of the eigenvalues of the (n, n) cosine kernel / n (Friedman & Dieng 2023)."""
    lam = np.linalg.eigvalsh(_unit(x) @ _unit(x).T / len(x))
    lam = lam[lam > 1e-12]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def clip(x, t) -> float:
    return float(100 * np.mean(np.maximum(_unit(x) @ _unit(t).ravel(), 0)))


def frechet(x, y) -> float:
    """The FID formula with scipy's matrix square root (torchmetrics uses eigenvalues)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def boot_ci(a, b, stat, *, n_boot=1000, seed=0):
    """The paired percentile bootstrap as a plain loop: the same seeds' rows on both sides, ratio b / a, 2.5% and 97.5%."""
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    ratios = [stat(b[i]) / stat(a[i]) for i in idx if stat(a[i]) != 0]
    return np.percentile(ratios, [2.5, 97.5])


def check_set(scores, emb, text):
    assert scores["n"] == len(emb)
    assert scores["diversity"] == pytest.approx(diversity(emb), **TOL)
    assert scores["vendi"] == pytest.approx(vendi(emb), **TOL)
    if text is None:
        assert scores["clip_score"] is None
    else:
        assert scores["clip_score"] == pytest.approx(clip(emb, text), **TOL)


def check_report(doc, folder: Path, min_images: int):
    html = (folder / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and doc["key"] in html
    srcs = re.findall(r'src="([^"]+)"', html)
    assert len(srcs) >= min_images
    for src in srcs:  # self-contained: every image is an embedded PNG, nothing is fetched
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(href|src)="(http|file|/)', html)
    assert f"{doc['frechet_distance']:.4g}" in html if doc.get("frechet_distance") is not None else True
    for path in doc["report"].values():
        assert Path(path).is_file()


# ---------------------------------------------------------------- image folders


def _folder(path: Path, images: np.ndarray) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:03d}.png")
    return path


@pytest.fixture
def folders(tmp_path):
    from conceptkit.toy import render, sample_scenes

    a = _folder(tmp_path / "a", render(sample_scenes(10, 0)))
    b = _folder(tmp_path / "b", render(sample_scenes(12, 1)))
    Image.fromarray(render(sample_scenes(1, 3))[0]).save(b / "extra.jpg", quality=95)  # JPG is read too
    same = _folder(tmp_path / "same", np.repeat(render(sample_scenes(1, 2)), 6, axis=0))
    return a, b, same


def test_images_numbers_are_recomputed_from_the_saved_arrays(folders, tmp_path):
    a, b, _ = folders
    doc = _json(runner.invoke(app, ["evaluate", "images", str(a), str(b), "--prompt", "a shape", "--json",
                                    "--report", str(tmp_path / "rep")]))
    arr = _arrays(doc)
    assert doc["encoder"] == "toy" and doc["clip_available"] and not doc["cached"]
    check_set(doc["a"], arr["a_embeddings"], arr["text_embedding"])
    check_set(doc["b"], arr["b_embeddings"], arr["text_embedding"])
    assert doc["b"]["n"] == 13 and "extra.jpg" in doc["b"]["files"]
    assert doc["frechet_distance"] > 0.01
    assert doc["frechet_distance"] == pytest.approx(frechet(arr["a_embeddings"], arr["b_embeddings"]), **TOL)
    # the saved embeddings are the encoder's embeddings of the PNGs
    import torch

    from conceptkit.features import load_encoder

    enc = load_encoder("toy")
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in sorted(a.glob("*.png"))])).permute(0, 3, 1, 2).float() / 255
    assert np.allclose(enc.embed(x).numpy(), arr["a_embeddings"], atol=1e-5)
    assert np.allclose(enc.embed_text(["a shape"]).numpy(), arr["text_embedding"], atol=1e-6)
    check_report(doc, tmp_path / "rep", 2)
    # cached by the folders' contents and the settings
    again = _json(runner.invoke(app, ["evaluate", "images", str(a), str(b), "--prompt", "a shape", "--json"]))
    assert again["cached"] and again["key"] == doc["key"] and again["a"] == doc["a"]
    other = _json(runner.invoke(app, ["evaluate", "images", str(a), str(b), "--encoder", "pixel", "--json"]))
    assert other["key"] != doc["key"] and other["a"]["clip_score"] is None and not other["clip_available"]


def test_images_behave_as_a_user_expects(folders):
    a, b, same = folders
    one = _json(runner.invoke(app, ["evaluate", "images", str(a), str(a), "--json"]))
    assert one["frechet_distance"] == pytest.approx(0.0, abs=1e-6)  # a folder against itself
    dup = _json(runner.invoke(app, ["evaluate", "images", str(same), "--json"]))
    assert dup["a"]["diversity"] == pytest.approx(0.0, abs=1e-6) and dup["a"]["vendi"] == pytest.approx(1.0, abs=1e-4)
    assert one["a"]["diversity"] > 0.2 and one["a"]["vendi"] > 3
    assert dup["b"] is None and dup["frechet_distance"] is None
    r = runner.invoke(app, ["evaluate", "images", str(a)])  # tables on stderr, nothing on stdout
    assert r.exit_code == 0 and r.stdout == "" and "diversity" in r.stderr


def test_images_bad_input_is_one_line_exit_2(folders, tmp_path):
    a, _, _ = folders
    (tmp_path / "empty").mkdir()
    _folder(tmp_path / "one", np.zeros((1, 8, 8, 3), np.uint8))
    bad = tmp_path / "bad"
    shutil.copytree(a, bad)
    (bad / "broken.png").write_bytes(b"not a png at all")
    cases = [
        (["evaluate", "images", str(tmp_path / "nowhere")], "not a folder"),
        (["evaluate", "images", str(tmp_path / "empty")], "no PNG or JPG"),
        (["evaluate", "images", str(tmp_path / "one")], "one image"),
        (["evaluate", "images", str(bad)], "broken.png"),
        (["evaluate", "images", str(a), "--encoder", "what"], "--encoder"),
        (["evaluate", "images", str(a), "--encoder", "clip:/no/such/clip"], "/no/such/clip"),
        (["evaluate", "images", str(a), str(tmp_path / "empty")], "no PNG or JPG"),
        (["evaluate", "sliders", "no-such-set"], "no slider set"),
        (["evaluate", "sliders", "../etc"], "invalid"),
        (["evaluate", "sliders", "no-such-set", "--factor-seeds", "1"], "--factor-seeds"),
        (["evaluate", "cluster", "ffffffff"], "no cluster"),
    ]
    for args, fragment in cases:
        assert fragment in _one_line_error(runner.invoke(app, args)), args


# ---------------------------------------------------------------- a slider set


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory):
    """A 2-slider set on the toy model, 4-step sampling, 3 training steps: trained once through the CLI."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONCEPTKIT_HOME", str(home))
        r = runner.invoke(app, ["sliders", "a shape", "--count", "2", "--samples", "4", "--steps", "4", "--train-steps", "3", "--json"])
        assert r.exit_code == 0, r.output
    return Path(json.loads(r.stdout)["path"])


def _install(path: Path) -> None:
    shutil.copytree(path, store.kind_dir("sliders") / path.name)


def test_sliders_numbers_are_recomputed_from_the_saved_arrays(toy_set, tmp_path):
    _install(toy_set)
    doc = _json(runner.invoke(app, ["evaluate", "sliders", "a-shape", "--count", "8", "--effect-count", "4", "--factor-seeds", "6", "--json",
                                    "--report", str(tmp_path / "rep")]))
    arr = _arrays(doc)
    k, n, e = 2, 8, 4
    assert doc["set"] == "a-shape" and doc["model"]["spec"] == "toy" and doc["encoder"] == "toy" and doc["steps"] == 4
    assert arr["base_embeddings"].shape[0] == n and arr["slider_embeddings"].shape[0] == n
    assert arr["effect_plus_embeddings"].shape[:2] == (k, e) and arr["effect_plus_images"].shape == (k, e, 32, 32, 3)
    # the random sparse combinations: min(3, K) distinct sliders per image, strengths in the stated range
    w = arr["slider_weights"]
    assert w.shape == (n, k) and ((w != 0).sum(1) == min(3, k)).all() and np.abs(w).max() <= doc["scale"]
    assert doc["strength_range"] == [-2.0, 2.0]
    t = arr["text_embedding"]
    check_set(doc["base"], arr["base_embeddings"], t)
    check_set(doc["sliders"], arr["slider_embeddings"], t)
    assert doc["frechet_distance"] == pytest.approx(frechet(arr["base_embeddings"], arr["slider_embeddings"]), **TOL)
    b, s = doc["base"], doc["sliders"]
    assert doc["diversity_ratio"] == pytest.approx(s["diversity"] / b["diversity"], **TOL)
    assert doc["vendi_ratio"] == pytest.approx(s["vendi"] / b["vendi"], **TOL)
    assert doc["clip_score_change"] == pytest.approx(s["clip_score"] / b["clip_score"] - 1, **TOL)
    check_intervals(doc, arr)
    # per slider: effect sizes and the cosine matrix of mean effects
    base = np.asarray(arr["base_embeddings"][:e], np.float64)
    plus, minus = arr["effect_plus_embeddings"].astype(np.float64), arr["effect_minus_embeddings"].astype(np.float64)
    for j, row in enumerate(doc["per_slider"]):
        assert row["effect_size"] == pytest.approx(np.sqrt(((plus[j] - base) ** 2).sum(1)).mean(), **TOL)
        assert row["effect_size_minus"] == pytest.approx(np.sqrt(((minus[j] - base) ** 2).sum(1)).mean(), **TOL)
        assert row["effect_size"] > 0
    mean_eff = _unit((plus - base[None]).mean(1))
    assert np.allclose(doc["effect_cosines"], mean_eff @ mean_eff.T, atol=1e-6)
    # the factor table, re-read from the saved images with the toy analyser and counted here
    from conceptkit.toy import analyse

    f = doc["factors"]
    groups = {"colour": ("colour",), "shape": ("shape",), "size": ("size",), "position": ("horizontal", "vertical"),
              "background": ("background",)}
    assert f["factors"] == list(groups)
    # the effect images are the first effect_count seeds of the factor table's slider images
    assert arr["factor_slider_minus_images"].shape == (k, 6, 32, 32, 3)
    assert (arr["factor_slider_minus_images"][:, :e] == arr["effect_minus_images"]).all()
    for j, row in enumerate(f["per_slider"]):
        lo = [analyse(im) for im in arr["factor_slider_minus_images"][j]]
        hi = [analyse(im) for im in arr["factor_slider_plus_images"][j]]
        pairs = [(x.factors, y.factors) for x, y in zip(lo, hi) if x.valid and y.valid]
        assert row["valid"] == pytest.approx(len(pairs) / 6)
        change = [np.mean([any(x[q] != y[q] for q in keys) for x, y in pairs]) if pairs else 0.0 for keys in groups.values()]
        assert [row["change"][g] for g in groups] == pytest.approx(change)
        if max(change) >= 0.05:
            assert row["main"] == list(groups)[int(np.argmax(change))]
            assert row["purity"] == pytest.approx(max(change) / sum(change))
        else:
            assert row["main"] is None
    check_factor_table(doc, arr, groups)
    # factor entropy of each set, from the analyser's readings of the saved images
    from conceptkit.toy import FACTORS

    for side, images in (("base", arr["base_images"]), ("sliders", arr["slider_images"])):
        ok = [r.factors for r in map(analyse, images) if r.valid]
        assert doc["factor_entropy"][side]["valid"] == pytest.approx(len(ok) / n)
        for name, values in FACTORS.items():
            p = np.array([sum(r[name] == v for r in ok) for v in values], float) / len(ok)
            p = p[p > 0]
            assert doc["factor_entropy"][side]["entropy"][name] == pytest.approx(-(p * np.log(p)).sum() / np.log(len(values)), abs=1e-9)
    check_report(doc, tmp_path / "rep", 5)
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "factor recovery" in html and doc["per_slider"][0]["label"] in html
    assert f"{doc['vendi_ratio']:.4g} [{doc['vendi_ratio_ci'][0]:.4g}, {doc['vendi_ratio_ci'][1]:.4g}]" in html
    assert "paired bootstrap" in html
    # cached: the same settings recompute nothing; other settings do
    again = _json(runner.invoke(app, ["evaluate", "sliders", "a-shape", "--count", "8", "--effect-count", "4", "--factor-seeds", "6", "--json"]))
    assert again["cached"] and again["key"] == doc["key"] and again["base"] == doc["base"]
    assert all(again[f] == doc[f] for f in CI_FIELDS)
    # a result cached before the intervals existed gets them from its saved arrays
    manifest = Path(doc["path"]) / "manifest.json"
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({f: v for f, v in old.items() if f not in CI_FIELDS}))
    older = _json(runner.invoke(app, ["evaluate", "sliders", "a-shape", "--count", "8", "--effect-count", "4", "--factor-seeds", "6", "--json"]))
    assert older["cached"] and all(older[f] == pytest.approx(doc[f], **TOL) for f in CI_FIELDS if doc[f] is not None)
    r = runner.invoke(app, ["evaluate", "sliders", "a-shape", "--count", "8", "--effect-count", "4", "--factor-seeds", "6"])  # the table shows them
    lo, hi = doc["diversity_ratio_ci"]
    assert r.exit_code == 0 and f"[{lo:.4f}," in r.stderr and f"{hi:.4f}]" in r.stderr  # (rich wraps the cell at 80 columns)
    assert "higher diversity with sliders" in r.stderr
    r = runner.invoke(app, ["evaluate", "sliders", "a-shape", "--count", "1"])
    assert "--count" in _one_line_error(r)


def check_factor_table(doc, arr, groups):
    """The three-row distribution table, recounted from the saved images: readings, joint values, TV distances,
    the noise floor over the same random halves of the base seeds, effects, purity and consistency."""
    from collections import Counter

    from conceptkit.toy import FACTORS, analyse
    from conceptkit.toy.distribution import FLOOR_SPLITS

    t = doc["factor_table"]
    n = 6
    base = [analyse(im) for im in arr["factor_base_images"]]
    assert t["seeds"] == n and t["base_seeds"] == 2 * n == len(base) and list(t["rows"]) == ["sliders", "random", "prompt_edits"]

    def value(r, keys):
        return tuple(r.factors[q] for q in keys) if r.valid else None

    def tv(xs, ys):
        xs, ys = [x for x in xs if x is not None], [y for y in ys if y is not None]
        cx, cy = Counter(xs), Counter(ys)
        return 0.5 * sum(abs(cx[v] / len(xs) - cy[v] / len(ys)) for v in set(cx) | set(cy))

    floor = {}
    for g, keys in groups.items():
        vals = [value(r, keys) for r in base]
        rng = np.random.default_rng(doc["seed"])
        halves = [rng.permutation(2 * n) for _ in range(FLOOR_SPLITS)]
        floor[g] = np.mean([tv([vals[i] for i in p[:n]], [vals[i] for i in p[n:]]) for p in halves])
        assert t["floor"][g] == pytest.approx(floor[g], abs=1e-9)
    for name, (lo_key, hi_key) in {"sliders": ("slider_minus", "slider_plus"), "random": ("random_minus", "random_plus"),
                                   "prompt_edits": ("edit_minus", "edit_plus")}.items():
        d = t["rows"][name]["distribution"]
        los, his = arr[f"factor_{lo_key}_images"], arr[f"factor_{hi_key}_images"]
        assert los.shape[1] == n and len(d["per_slider"]) == len(los) == (4 if name == "prompt_edits" else 2)
        mains = []
        for j, row in enumerate(d["per_slider"]):
            lo, hi = [analyse(im) for im in los[j]], [analyse(im) for im in his[j]]
            eff = {}
            for g, keys in groups.items():
                dist = tv([value(r, keys) for r in lo], [value(r, keys) for r in hi])
                assert row["tv"][g] == pytest.approx(dist, abs=1e-9)
                eff[g] = max(0.0, dist - floor[g])
                assert row["effect"][g] == pytest.approx(eff[g], abs=1e-9)
            top = max(eff.values())
            main = next(g for g in groups if eff[g] == top) if top > 0 else None
            assert row["main"] == main and row["main_effect"] == pytest.approx(top, abs=1e-9)
            if main is None:
                assert row["distribution_purity"] is None and row["toward"] == 0.0
                continue
            mains.append(row)
            assert row["distribution_purity"] == pytest.approx(top / sum(eff.values()), abs=1e-9)
            # consistency on the main group's key that moves most, toward the value whose share grows most
            pairs = [(x.factors, y.factors) for x, y in zip(lo, hi) if x.valid and y.valid]
            key = max(groups[main], key=lambda q: tv([value(r, (q,)) for r in lo], [value(r, (q,)) for r in hi]))
            gain = {v: sum(b[key] == v for _, b in pairs) - sum(a[key] == v for a, _ in pairs) for v in FACTORS[key]}
            plus = max(FACTORS[key], key=lambda v: gain[v])  # first of the ties, in the vocabulary's order
            assert row["plus_value"] == f"{key}={plus}"
            assert row["toward"] == pytest.approx(np.mean([b[key] == plus and a[key] != plus for a, b in pairs]), abs=1e-9)
        s = t["rows"][name]["summary"]
        assert s["n_above_floor"] == d["n_above_floor"] == len(mains)
        assert s["distribution_purity"] == (pytest.approx(np.mean([r["distribution_purity"] for r in mains])) if mains else None)
        assert s["main_effect"] == pytest.approx(np.mean([r["main_effect"] for r in d["per_slider"]]))
        assert s["coverage"] == len({r["main"] for r in mains} - {"background"})
        assert s["per_seed_purity"] == pytest.approx(t["rows"][name]["per_seed"]["mean_purity"])


CI_FIELDS = ("diversity_ratio_ci", "vendi_ratio_ci", "clip_score_change_ci", "diversity_higher", "clip_within_5pct")


def check_intervals(doc, arr):
    """The 95% paired bootstrap intervals and verdicts, from the saved embeddings with the slow loop."""
    a, b, t = arr["base_embeddings"], arr["slider_embeddings"], arr["text_embedding"]
    assert doc["ci_level"] == 0.95 and doc["ci_resamples"] == 1000
    assert doc["diversity_ratio_ci"] == pytest.approx(list(boot_ci(a, b, diversity, seed=doc["seed"])), **TOL)
    assert doc["vendi_ratio_ci"] == pytest.approx(list(boot_ci(a, b, vendi, seed=doc["seed"])), **TOL)
    assert doc["clip_score_change_ci"] == pytest.approx(list(boot_ci(a, b, lambda x: clip(x, t), seed=doc["seed"]) - 1), **TOL)
    lo, hi = doc["clip_score_change_ci"]
    assert doc["diversity_higher"] is (doc["diversity_ratio_ci"][0] > 1)
    assert doc["clip_within_5pct"] is (-0.05 <= lo and hi <= 0.05)


def _spread(n, d, rng, noise):
    """n rows around one direction with this much noise (small: a narrow set; large: a spread one)."""
    return np.ones(d) + noise * rng.normal(size=(n, d))


def test_paired_bootstrap_matches_the_plain_loop():
    from conceptkit.metrics import (paired_bootstrap, resample_counts, resampled_clip_score, resampled_mean_pairwise_distance,
                                    resampled_vendi_score)

    rng = np.random.default_rng(3)
    for n, d in ((12, 5), (10, 24)):  # Vendi from the (d, d) and from the (n, n) kernel
        a, b, t = _spread(n, d, rng, 0.5), _spread(n, d, rng, 0.8), rng.normal(size=(1, d))
        idx = np.random.default_rng(7).integers(0, n, size=(300, n))
        assert np.array_equal(resample_counts(n, 300, 7), np.stack([np.bincount(i, minlength=n) for i in idx]))
        for stat, slow in ((resampled_mean_pairwise_distance, diversity), (resampled_vendi_score, vendi),
                           (lambda x, c: resampled_clip_score(x, t, c), lambda x: clip(x, t))):
            got = paired_bootstrap(a, b, stat, n_boot=300, seed=7)
            assert got == pytest.approx(list(boot_ci(a, b, slow, n_boot=300, seed=7)), **TOL)
            assert got != paired_bootstrap(a, b, stat, n_boot=300, seed=8)  # the seed picks the resamples
        assert paired_bootstrap(a, b, resampled_vendi_score, n_boot=300, seed=7, level=0.5) == pytest.approx(
            list(np.percentile([vendi(b[i]) / vendi(a[i]) for i in idx], [25, 75])), **TOL)


def test_paired_bootstrap_identical_and_more_spread_sets():
    from conceptkit.metrics import paired_bootstrap, resampled_clip_score, resampled_mean_pairwise_distance, resampled_vendi_score

    rng = np.random.default_rng(0)
    a, t = _spread(32, 16, rng, 0.3), rng.normal(size=16)
    stats = (resampled_mean_pairwise_distance, resampled_vendi_score, lambda x, c: resampled_clip_score(x, t, c))
    for stat in stats:
        assert paired_bootstrap(a, a.copy(), stat, seed=5) == (1.0, 1.0)  # every resample's ratio is exactly 1
    wide = _spread(32, 16, rng, 3.0)
    for stat in stats[:2]:
        lo, hi = paired_bootstrap(a, wide, stat, seed=5)
        assert 1 < lo < hi
    same = np.repeat(a[:1], 4, axis=0)  # no diversity on either side: no ratio at all
    assert paired_bootstrap(same, same, resampled_mean_pairwise_distance) is None


# ---------------------------------------------------------------- a clustering (Picasso's VbSC)


@pytest.fixture(scope="module")
def toy_cluster(tmp_path_factory):
    """A k=2 clustering of 'a red circle' on the toy (2 samples, 4 steps) with k and tau sweeps, made once through the CLI."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONCEPTKIT_HOME", str(home))
        r = runner.invoke(app, ["cluster", "a red circle", "--samples", "2", "--steps", "4", "--k", "2", "--sweep-k", "2:3",
                                "--sweep-tau", "0.8:0.9:2", "--json"])
        assert r.exit_code == 0, r.output
    return home, json.loads(r.stdout)


def test_cluster_vbsc_is_recomputed_with_scikit_learn(toy_cluster, tmp_path, monkeypatch):
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

    home, cl = toy_cluster
    monkeypatch.setenv("CONCEPTKIT_HOME", str(home))  # the cluster and its neurons artifact live there
    doc = _json(runner.invoke(app, ["evaluate", "cluster", cl["key"][:8], "--count", "4", "--json", "--report", str(tmp_path / "rep")]))
    arr = _arrays(doc)
    k, n = 2, 4
    assert doc["cluster"] == cl["key"] and doc["k"] == k and doc["per_subconcept"] == n and doc["mode"] == "only"
    x, y = arr["embeddings"].astype(np.float64), arr["labels"]
    assert x.shape[0] == k * n and y.tolist() == [0] * n + [1] * n and arr["images"].shape == (k, n, 32, 32, 3)
    v = doc["vbsc"]
    assert v["calinski_harabasz"] == pytest.approx(calinski_harabasz_score(x, y), **TOL)
    assert v["davies_bouldin"] == pytest.approx(davies_bouldin_score(x, y), **TOL)
    assert v["silhouette"] == pytest.approx(silhouette_score(x, y), **TOL)
    t = arr["text_embedding"]
    base = arr["base_embeddings"].astype(np.float64)
    for c, row in enumerate(doc["per_subconcept_scores"]):
        check_set(row, x[y == c], t)
        assert row["shift_from_base"] == pytest.approx(np.sqrt(((x[y == c] - base) ** 2).sum(1)).mean(), **TOL)
    check_set(doc["base"], base, t)
    # the sub-concepts draw something other than the unmodified model
    assert max(r["shift_from_base"] for r in doc["per_subconcept_scores"]) > 1e-3
    # heatmap, elbow and tau curve come from the cluster artifact
    assert doc["has"] == {"heatmap": True, "elbow": True, "tau_curve": True}
    assert doc["sweeps"] == cl["sweeps"] and doc["neuron_clustering"] == cl["metrics"]
    assert np.array_equal(arr["similarity_jaccard"], np.load(cl["arrays"]["similarity_jaccard"]))
    check_report(doc, tmp_path / "rep", 4)
    assert {"heatmap", "elbow", "tau_curve", "subconcept_grid", "html"} <= set(doc["report"])
    for args, fragment in ((["--mode", "sideways"], "--mode"), (["--count", "1"], "--count")):
        assert fragment in _one_line_error(runner.invoke(app, ["evaluate", "cluster", cl["key"], *args]))
