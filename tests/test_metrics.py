"""Metric maths against closed forms and scikit-learn / scikit-fuzzy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import skfuzzy
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from conceptkit.errors import UsageError
from conceptkit.metrics import (
    ClusterScores,
    clip_score,
    cluster_scores,
    effect_cosines,
    effect_size,
    frechet_distance,
    mean_pairwise_distance,
    normalised_entropy,
    vendi_score,
)


def exact_gaussian_sample(rng, n, mean, cov):
    """n points whose sample mean and (n-1)-normalised covariance are exactly `mean` and `cov`."""
    d = len(mean)
    z = rng.normal(size=(n, d))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mean + z @ np.linalg.cholesky(cov).T


# --------------------------------------------------------------------------- Fréchet


def test_frechet_matches_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    x = exact_gaussian_sample(rng, 200, mu1, np.diag(s1))
    y = exact_gaussian_sample(rng, 300, mu2, np.diag(s2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert expected == pytest.approx(1 + 4 + 0.25 + 4 + 1 + 0)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(y, x) == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_general_formula_with_full_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    c1, c2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    x = exact_gaussian_sample(rng, 100, mu1, c1)
    y = exact_gaussian_sample(rng, 100, mu2, c2)
    r1 = scipy.linalg.sqrtm(c1).real  # symmetric form: Tr((C1^1/2 C2 C1^1/2)^1/2)
    cross = np.trace(scipy.linalg.sqrtm(r1 @ c2 @ r1).real)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * cross
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)


def test_frechet_one_dimension_and_identical_sets():
    x = np.array([[0.0], [2.0]])  # mean 1, var 2
    y = np.array([[3.0], [7.0]])  # mean 5, var 8
    assert frechet_distance(x, y) == pytest.approx(16 + (math.sqrt(2) - math.sqrt(8)) ** 2)
    z = np.random.default_rng(2).normal(size=(50, 8))
    assert frechet_distance(z, z.copy()) == pytest.approx(0.0, abs=1e-8)


def test_frechet_singular_covariance_is_finite():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 3.0  # n < d: rank-deficient
    d = frechet_distance(x, y)
    assert np.isfinite(d) and d > 20 * 9 * 0.5


def test_frechet_rejects_bad_shapes():
    with pytest.raises(UsageError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(UsageError):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# --------------------------------------------------------------------------- diversity


def test_vendi_identical_orthogonal_and_two_groups():
    v = np.array([0.3, -1.0, 2.0, 0.5])
    assert vendi_score(np.tile(v, (7, 1))) == pytest.approx(1.0)
    assert vendi_score(3.0 * np.eye(6)) == pytest.approx(6.0)
    assert vendi_score(np.eye(5)[:, :]) == pytest.approx(5.0)
    two = np.array([[1.0, 0, 0]] * 4 + [[0, 2.0, 0]] * 4)
    assert vendi_score(two) == pytest.approx(2.0)


def test_vendi_two_items_with_known_cosine():
    c = 0.6
    x = np.array([[1.0, 0.0], [c, math.sqrt(1 - c * c)]])
    lam = np.array([(1 + c) / 2, (1 - c) / 2])
    assert vendi_score(x) == pytest.approx(math.exp(-np.sum(lam * np.log(lam))))
    # n > d uses the (d, d) Gram matrix: same answer as the n x n route
    rng = np.random.default_rng(4)
    y = rng.normal(size=(30, 3))
    u = y / np.linalg.norm(y, axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(u @ u.T / 30)
    lam = lam[lam > 1e-12]
    assert vendi_score(y) == pytest.approx(math.exp(-np.sum(lam * np.log(lam))))


def test_vendi_rejects_zero_row():
    with pytest.raises(UsageError):
        vendi_score(np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_mean_pairwise_distance_known_values():
    assert mean_pairwise_distance(np.eye(4)) == pytest.approx(1.0)
    assert mean_pairwise_distance(np.tile([1.0, 2.0], (3, 1))) == pytest.approx(0.0, abs=1e-12)
    pts = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    assert mean_pairwise_distance(pts, metric="euclidean") == pytest.approx(20 / 3)
    with pytest.raises(UsageError):
        mean_pairwise_distance(np.eye(1))


def test_normalised_entropy_known_values():
    assert normalised_entropy([0, 1, 2, 3] * 5, 4) == pytest.approx(1.0)
    assert normalised_entropy([2] * 9, 4) == pytest.approx(0.0)
    assert normalised_entropy([0, 1, 0, 1], 4) == pytest.approx(0.5)
    p = np.array([0.75, 0.25])
    assert normalised_entropy([0, 0, 0, 1], 2) == pytest.approx(-np.sum(p * np.log(p)) / math.log(2))
    for bad in ([0, 4], [-1, 0]):
        with pytest.raises(UsageError):
            normalised_entropy(bad, 4)
    with pytest.raises(UsageError):
        normalised_entropy([0, 0], 1)


# --------------------------------------------------------------------------- CLIP score


def test_clip_score_convention_and_broadcast():
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert clip_score(np.array([[2.0, 0.0]]), e1) == pytest.approx(100.0)  # scale-free
    assert clip_score(np.array([[0.6, 0.8]]), np.array([[5.0, 0.0]])) == pytest.approx(60.0)
    assert clip_score(np.stack([e1, e2]), e1) == pytest.approx(50.0)  # one text for all
    assert clip_score(np.stack([e1, e2]), np.stack([e1, e2])) == pytest.approx(100.0)  # paired
    assert clip_score(np.array([[-1.0, 0.0]]), e1) == pytest.approx(0.0)  # negatives clamp
    assert clip_score(np.array([[0.6, 0.8]]), e1, scale=2.5) == pytest.approx(1.5)
    with pytest.raises(UsageError):
        clip_score(np.eye(3)[:, :2], np.eye(2))  # 3 images, 2 texts


# --------------------------------------------------------------------------- clusters


def test_cluster_scores_match_sklearn_and_skfuzzy_fpc():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(c, 0.7, size=(30, 2)) for c in ([0, 0], [4, 0], [0, 4])])
    _, u, _, _, _, _, fpc = skfuzzy.cluster.cmeans(x.T, 3, 2.0, 1e-6, 500, seed=0)
    labels = np.argmax(u, axis=0)
    s = cluster_scores(x, labels, u)
    assert isinstance(s, ClusterScores)
    assert s.calinski_harabasz == pytest.approx(calinski_harabasz_score(x, labels))
    assert s.davies_bouldin == pytest.approx(davies_bouldin_score(x, labels))
    assert s.silhouette == pytest.approx(silhouette_score(x, labels))
    assert s.fpc == pytest.approx(fpc)
    assert 1 / 3 < s.fpc < 1


def test_cluster_scores_fpc_extremes_and_degenerate_labels():
    x = np.random.default_rng(6).normal(size=(10, 3))
    labels = np.arange(10) % 2
    assert cluster_scores(x, labels, np.full((4, 10), 0.25)).fpc == pytest.approx(0.25)
    onehot = np.eye(2)[:, labels]
    assert cluster_scores(x, labels, onehot).fpc == pytest.approx(1.0)
    s = cluster_scores(x, np.zeros(10, dtype=int))
    assert (s.calinski_harabasz, s.davies_bouldin, s.silhouette, s.fpc) == (None, None, None, None)
    with pytest.raises(UsageError):
        cluster_scores(x, labels, np.full((10, 2), 0.5))  # (n, k) instead of (k, n)


# --------------------------------------------------------------------------- sliders


def test_effect_cosines():
    e = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    c = effect_cosines(e)
    expected = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_allclose(c, expected, atol=1e-12)
    per_sample = np.stack([[[1.0, 1.0], [1.0, -1.0]], [[0.0, 1.0], [0.0, 3.0]]])  # means (1,0), (0,2)
    np.testing.assert_allclose(effect_cosines(per_sample), np.eye(2), atol=1e-12)
    v = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert effect_cosines(v)[0, 1] == pytest.approx(1 / math.sqrt(2))


def test_effect_size_raw_and_standardised():
    before = np.array([[1.0, 0.0], [-1.0, 0.0]])  # population spread sqrt(1 + 0) = 1
    after = before + np.array([3.0, 4.0])
    assert effect_size(before, after) == pytest.approx(5.0)
    assert effect_size(before, after, standardise=True) == pytest.approx(5.0)
    assert effect_size(2 * before, 2 * before + [3.0, 4.0], standardise=True) == pytest.approx(2.5)
    mixed = before + np.array([[0.0, 1.0], [0.0, 3.0]])  # shifts of 1 and 3
    assert effect_size(before, mixed) == pytest.approx(2.0)
    with pytest.raises(UsageError):
        effect_size(before, after[:1])


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    img, txt = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    t_img = torch.tensor(img, dtype=torch.float64, requires_grad=True)
    assert clip_score(t_img, torch.tensor(txt)) == pytest.approx(clip_score(img, txt))
    assert frechet_distance(torch.tensor(img), torch.tensor(txt)) == pytest.approx(frechet_distance(img, txt))
