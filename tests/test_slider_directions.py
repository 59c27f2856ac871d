"""`principal_directions`: PCA (the paper) and its ICA rotation of the same subspace."""

from __future__ import annotations

import numpy as np
import pytest

from conceptkit.errors import UsageError
from conceptkit.sliders.train import principal_directions


def _mixture(n: int = 4000, seed: int = 0):
    """Two independent factors of equal variance (uniform and binary), mixed by a 30 degree rotation in 4-d."""
    rng = np.random.default_rng(seed)
    s = np.stack([rng.uniform(-1, 1, n) * np.sqrt(3), rng.choice([-1.0, 1.0], n)], 1)  # unit variance each
    a = np.deg2rad(30)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    x = np.zeros((n, 4))
    x[:, :2] = s @ rot.T
    x[:, 2:] = rng.normal(size=(n, 2)) * 0.05  # small noise off the factors' plane
    return x, rot.T  # rows of rot.T: the true factor directions in the first two coordinates


def test_ica_recovers_independent_factors_of_equal_variance_where_pca_cannot():
    x, truth = _mixture()
    def best_cos(dirs):  # for each true factor, the |cos| of the closest direction
        return np.abs(dirs[:, :2] @ truth.T).max(0)
    ica = principal_directions(x, 2, method="ica").components
    pca = principal_directions(x, 2, method="pca").components
    assert best_cos(ica).min() > 0.99
    assert best_cos(pca).min() < 0.99  # PCA's axes are a rotation it cannot tell apart
    # inside PCA's subspace (ICA's directions need not be orthogonal to each other)
    assert np.allclose(np.linalg.norm(ica @ pca.T, axis=1), 1, atol=1e-3)


def test_ica_directions_are_unit_rows_ordered_by_variance():
    x, _ = _mixture()
    d = principal_directions(x * np.array([2.0, 1.0, 1.0, 1.0]), 2, method="ica")
    assert np.allclose(np.linalg.norm(d.components, axis=1), 1, atol=1e-6)
    assert d.explained_variance_ratio[0] >= d.explained_variance_ratio[1] > 0
    assert (d.explained_variance_ratio <= 1).all()  # each its own share; not orthogonal, so shares need not add up


def test_unknown_method_is_refused():
    with pytest.raises(UsageError, match="--directions"):
        principal_directions(np.zeros((5, 3)) + np.arange(15).reshape(5, 3), 1, method="nmf")
