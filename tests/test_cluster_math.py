"""Picasso array maths: neuron selection, timestep similarity, maps, PCA, clustering."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import skfuzzy
from sklearn.metrics import adjusted_rand_score

from conceptkit.picasso.maths import (
    CLUSTERERS,
    Clustering,
    centres_to_maps,
    cluster_fcm,
    cluster_kmeans,
    correlation_matrix,
    high_pass,
    jaccard_matrix,
    random_groups,
    reduce_pca,
    resize_maps,
    segment,
    timestep_groups,
)
from conceptkit.errors import UsageError

CENTRES = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])


def blobs(seed=0, n_per=40, std=0.6):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, std, size=(n_per, 2)) for c in CENTRES])
    return x, np.repeat(np.arange(3), n_per)


# --------------------------------------------------------------------------- neurons


def test_timestep_groups_follow_prospect():
    t = np.array([0, 99, 100, 501, 999, 1000, 981])
    np.testing.assert_array_equal(timestep_groups(t, 10), [0, 0, 1, 5, 9, 9, 9])
    np.testing.assert_array_equal(timestep_groups(t, 1), np.zeros(7))
    np.testing.assert_array_equal(timestep_groups([0, 49, 50, 99], 2, num_train_timesteps=100), [0, 0, 1, 1])
    assert timestep_groups(t, 10).dtype == np.int64
    for bad in (0, 2.5):
        with pytest.raises(UsageError):
            timestep_groups(t, bad)


def test_high_pass_modes_on_known_array():
    a = np.arange(10.0)
    np.testing.assert_array_equal(np.flatnonzero(high_pass(a, 0.8, "quantile")), [8, 9])  # q = 7.2
    np.testing.assert_array_equal(np.flatnonzero(high_pass(a, 0.75, "relative")), [7, 8, 9])  # 6.75
    np.testing.assert_array_equal(np.flatnonzero(high_pass(a, 3, "absolute")), np.arange(3, 10))
    assert high_pass(a, 0.0, "quantile").all()
    assert high_pass(a, 0.0, "relative").all()


def test_high_pass_is_per_row_by_default_and_skips_nan():
    a = np.stack([np.arange(10.0), 100 * np.arange(10.0)])
    per_row = high_pass(a, 0.75, "relative")
    np.testing.assert_array_equal(per_row[0], per_row[1])
    assert per_row.sum() == 6
    whole = high_pass(a, 0.75, "relative", axis=None)  # threshold 675: only row 1 passes
    assert whole[0].sum() == 0 and whole[1].sum() == 3
    q = high_pass(a, 0.8, "quantile")  # per row: keep neurons 8 and 9 of each timestep
    np.testing.assert_array_equal(q, np.stack([np.arange(10) >= 8] * 2))
    assert high_pass(a, 0.8, "quantile", axis=None)[0].sum() == 0
    b = np.array([np.nan, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(high_pass(b, 0.5, "relative"), [False, False, True, True])
    assert not high_pass(b, 0.0, "quantile")[0]


@pytest.mark.parametrize(("tau", "mode"), [(-0.1, "quantile"), (1.0, "quantile"), (1.5, "relative"),
                                           (-0.01, "relative"), (np.inf, "absolute"), (0.5, "median")])
def test_high_pass_rejects_bad_tau_and_mode(tau, mode):
    with pytest.raises(UsageError):
        high_pass(np.arange(5.0), tau, mode)


def test_jaccard_known_sets():
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=bool)
    j = jaccard_matrix(masks)
    np.testing.assert_allclose(np.diag(j), 1.0)
    assert j[0, 1] == pytest.approx(1 / 3)
    assert j[0, 2] == 0.0 and j[0, 3] == 1.0
    np.testing.assert_allclose(j, j.T)


def test_correlation_matrix_identical_negated_constant_and_corrcoef():
    rng = np.random.default_rng(0)
    r = rng.normal(size=8)
    w = np.stack([r, 3 * r + 1, -r, np.full(8, 0.1), rng.normal(size=8)])
    c = correlation_matrix(w)
    assert np.isfinite(c).all()
    assert c[0, 1] == pytest.approx(1.0) and c[0, 2] == pytest.approx(-1.0)
    np.testing.assert_allclose(c[3], [0, 0, 0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(np.diag(c), 1.0)
    v = rng.normal(size=(6, 20))
    np.testing.assert_allclose(correlation_matrix(v), np.corrcoef(v), atol=1e-12)


def test_random_groups_sizes_disjoint_deterministic():
    g = random_groups(50, [5, 10, 0, 7], seed=3)
    assert [len(a) for a in g] == [5, 10, 0, 7]
    ids = np.concatenate(g)
    assert len(np.unique(ids)) == 22 and ids.min() >= 0 and ids.max() < 50
    assert all(np.all(np.diff(a) > 0) for a in g)
    assert all(np.array_equal(a, b) for a, b in zip(g, random_groups(50, [5, 10, 0, 7], seed=3)))
    assert not np.array_equal(g[1], random_groups(50, [5, 10, 0, 7], seed=4)[1])
    state = np.random.get_state()[1].copy()
    random_groups(10, [3], seed=0)
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    with pytest.raises(UsageError):
        random_groups(10, [6, 5])


# --------------------------------------------------------------------------- maps and PCA


def test_resize_maps_area_means_identity_and_order():
    big = np.arange(16.0).reshape(1, 4, 4)
    small = np.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 5.0], [5.0, 5.0]]])
    out = resize_maps({"down": big, "same": small}, 2, mode="area")
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out[0], [2.5, 4.5, 10.5, 12.5])  # 2x2 block means
    np.testing.assert_array_equal(out[1:], small.reshape(2, 4))  # unchanged, in order


def test_resize_maps_bilinear_keeps_constants_and_means():
    maps = [np.full((2, 4, 4), 7.0), np.full((8, 8), -2.0)]
    out = resize_maps(maps, (6, 6))
    assert out.shape == (3, 36)
    np.testing.assert_allclose(out[:2], 7.0)
    np.testing.assert_allclose(out[2], -2.0)
    ramp = np.tile(np.arange(4.0), (4, 1))[None]  # left-to-right ramp stays a ramp
    up = resize_maps([ramp], 8).reshape(8, 8)
    assert np.all(np.diff(up, axis=1) >= 0) and np.allclose(up, up[0])
    assert up.mean() == pytest.approx(ramp.mean())
    with pytest.raises(UsageError):
        resize_maps([ramp], 4, mode="nearest")


def test_resize_maps_bilinear_shrink_is_antialiased():
    noisy = np.random.default_rng(0).random((1, 16, 16))
    area = resize_maps([noisy], 4, mode="area")
    bilinear = resize_maps([noisy], 4)
    assert np.abs(bilinear - area).max() < 0.1  # plain (aliased) bilinear is ~0.24 off here


def test_reduce_pca_recovers_plane_and_clips_dim():
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(2, 6))
    x = rng.normal(size=(40, 2)) @ basis + 5.0
    z, pca = reduce_pca(x, 2, seed=0)
    assert z.shape == (40, 2)
    np.testing.assert_allclose(pca.inverse_transform(z), x, atol=1e-9)
    assert pca.explained_variance_ratio_.sum() == pytest.approx(1.0)
    p = reduce_pca(rng.normal(size=(4, 10)), 50, seed=0)
    assert p.z.shape == (4, 4)
    with pytest.raises(UsageError):
        reduce_pca(x, 0)


def test_centres_to_maps_and_segment():
    rng = np.random.default_rng(2)
    templates = np.zeros((3, 4, 4))
    templates[0, :, :2] = 1  # left
    templates[1, :, 2:] = 1  # right
    templates[2, :2, :] = 2  # top, strongest
    x = (rng.uniform(size=(30, 3)) @ templates.reshape(3, 16))
    z, pca = reduce_pca(x, 3, seed=0)
    maps = centres_to_maps(z[:5], pca, (4, 4))
    np.testing.assert_allclose(maps, x[:5].reshape(5, 4, 4), atol=1e-9)
    np.testing.assert_array_equal(centres_to_maps(x[:2], None, (4, 4)), x[:2].reshape(2, 4, 4))
    expected = np.array([[2, 2, 2, 2], [2, 2, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(segment(templates), expected)
    np.testing.assert_array_equal(segment(np.zeros((3, 2, 2))), 0)  # ties -> lowest id
    with pytest.raises(UsageError):
        centres_to_maps(x[:2], None, (3, 3))


# --------------------------------------------------------------------------- clustering


def test_fcm_recovers_blobs_with_valid_memberships():
    x, y = blobs()
    c = cluster_fcm(x, 3, seed=0)
    assert isinstance(c, Clustering) and c.method == "fcm" and c.k == 3
    assert adjusted_rand_score(y, c.labels) == 1.0
    assert c.membership.shape == (3, 120) and c.centres.shape == (3, 2)
    np.testing.assert_allclose(c.membership.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_array_equal(c.labels, np.argmax(c.membership, axis=0))
    assert c.fpc > 0.95
    assert c.fpc == pytest.approx(np.sum(c.membership**2) / 120)
    order = np.argsort([np.argmin(np.linalg.norm(CENTRES - cc, axis=1)) for cc in c.centres])
    np.testing.assert_allclose(c.centres[order], CENTRES, atol=0.3)
    assert 0 < c.n_iter < 1000 and c.seconds >= 0


def test_fcm_fpc_near_one_over_k_for_noise():
    noise = np.random.default_rng(7).normal(size=(200, 50))
    for k in (2, 4):
        assert cluster_fcm(noise, k, seed=0).fpc == pytest.approx(1 / k, abs=0.01)


def test_fcm_matches_skfuzzy_fpc_and_is_deterministic():
    x, _ = blobs(seed=1)
    a, b = cluster_fcm(x, 3, seed=5), cluster_fcm(x, 3, seed=5)
    np.testing.assert_array_equal(a.membership, b.membership)
    np.testing.assert_array_equal(a.centres, b.centres)
    _, _, _, _, _, _, fpc = skfuzzy.cluster.cmeans(x.T, 3, 2.0, 1e-5, 1000, seed=0)
    assert a.fpc == pytest.approx(fpc, abs=1e-6)  # same optimum from a different start
    assert adjusted_rand_score(a.labels, cluster_fcm(x, 3, seed=11).labels) == 1.0


def test_fcm_centres_match_skfuzzy_at_convergence():
    rng = np.random.default_rng(0)  # overlapping blobs: fuzzy weights u^m matter
    x = np.concatenate([rng.normal(c, 0.7, size=(40, 2)) for c in CENTRES * 0.3])
    c = cluster_fcm(x, 3, seed=0, error=1e-9)
    cntr, *_ = skfuzzy.cluster.cmeans(x.T, 3, 2.0, 1e-9, 1000, seed=0)
    match = [np.argmin(np.linalg.norm(cntr - cc, axis=1)) for cc in c.centres]
    assert sorted(match) == [0, 1, 2]
    np.testing.assert_allclose(c.centres, cntr[match], atol=1e-6)


def test_fcm_leaves_global_rng_alone():
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    cluster_fcm(blobs()[0], 3, seed=0)
    np.testing.assert_array_equal(np.random.random(3), expected)


@pytest.mark.parametrize("clusterer", [cluster_fcm, cluster_kmeans])
@pytest.mark.parametrize("k", [1, 0, 121, 2.5])
def test_bad_k_raises(clusterer, k):
    with pytest.raises(UsageError):
        clusterer(blobs()[0], k)


def test_bad_fuzzifier_raises():
    with pytest.raises(UsageError):
        cluster_fcm(blobs()[0], 3, m=1.0)


def test_kmeans_is_an_interchangeable_hard_baseline():
    assert inspect.signature(cluster_kmeans).parameters.keys() == inspect.signature(cluster_fcm).parameters.keys()
    assert CLUSTERERS == {"fcm": cluster_fcm, "kmeans": cluster_kmeans}
    x, y = blobs()
    c = cluster_kmeans(x, 3, seed=0)
    assert c.method == "kmeans" and c.fpc == 1.0
    assert adjusted_rand_score(y, c.labels) == 1.0
    np.testing.assert_array_equal(c.membership, np.eye(3)[:, c.labels])


def test_pipeline_maps_to_segments():
    """Neurons with 3 spatial patterns at two layer resolutions: resize, PCA, FCM, decode, segment."""
    rng = np.random.default_rng(3)
    t = np.zeros((3, 8, 8))
    t[0, :4, :4], t[1, :4, 4:], t[2, 4:, :] = 1.0, 1.0, 1.0  # top-left, top-right, bottom
    truth = np.repeat(np.arange(3), 20)
    hi = t[truth] + 0.05 * rng.normal(size=(60, 8, 8))
    lo = t[truth].reshape(60, 4, 2, 4, 2).mean(axis=(2, 4)) + 0.05 * rng.normal(size=(60, 4, 4))
    feats = resize_maps({"up.0": hi[:30], "mid": lo[30:]}, 8)
    z, pca = reduce_pca(feats, 5, seed=0)
    c = cluster_fcm(z, 3, seed=0)
    assert adjusted_rand_score(truth, c.labels) == 1.0
    seg = segment(centres_to_maps(c.centres, pca, (8, 8)))
    for j in range(3):  # each cluster's segment is its pattern's region
        assert np.array_equal(seg == c.labels[truth == j][0], t[j] > 0)
