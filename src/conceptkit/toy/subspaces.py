"""Factor subspaces of an embedding space, and how directions line up with them (the PCA stage of SliderSpace).

A factor's subspace is spanned by its value-mean differences: for labelled embeddings, the mean
embedding of each value minus the grand mean (V values give at most V - 1 dimensions). A
direction's composition is the share of its squared length inside each factor's subspace; the
principal angles between two subspaces (Björck & Golub 1973) say how well one spans the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def orthonormal(vectors: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """(r, d) orthonormal rows spanning the (m, d) rows of `vectors` (rank r by SVD, relative tolerance `tol`)."""
    v = np.asarray(vectors, np.float64)
    if v.size == 0:
        return np.zeros((0, v.shape[-1]))
    _, s, vt = np.linalg.svd(v, full_matrices=False)
    return vt[s > tol * max(s.max(), 1e-300)]


def mean_difference_basis(embeddings: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(V - 1, d) orthonormal basis of the value-mean differences of one factor.

    Args:
        embeddings: (M, d) embeddings of labelled examples.
        values: (M,) the factor's value code of each example; every value present counts.
    """
    x = np.asarray(embeddings, np.float64)
    v = np.asarray(values)
    if len(x) != len(v):
        raise ValueError(f"{len(x)} embeddings but {len(v)} labels")
    grand = x.mean(0)
    means = np.stack([x[v == u].mean(0) - grand for u in np.unique(v)])
    return orthonormal(means)[: max(0, len(means) - 1)]


def principal_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the row spaces of (p, d) `a` and (q, d) `b`, largest first (min(p, q) of them)."""
    qa, qb = orthonormal(a), orthonormal(b)
    if len(qa) == 0 or len(qb) == 0:
        return np.zeros(0)
    return np.clip(np.linalg.svd(qa @ qb.T, compute_uv=False), 0.0, 1.0)


def composition(directions: np.ndarray, bases: Sequence[np.ndarray]) -> np.ndarray:
    """(K, G) share of each direction's squared length inside each basis's span (orthonormal rows).

    Args:
        directions: (K, d) directions (any length; zero rows give 0).
        bases: G orthonormal (r_g, d) bases.
    """
    u = np.asarray(directions, np.float64)
    n2 = (u * u).sum(1)
    out = np.stack([((u @ np.asarray(b, np.float64).T) ** 2).sum(1) for b in bases], 1) if len(bases) else np.zeros((len(u), 0))
    return np.where(n2[:, None] > 0, out / np.maximum(n2[:, None], 1e-300), 0.0)


def captured(basis: np.ndarray, subspace: np.ndarray) -> float:
    """Mean squared cosine of the principal angles of `basis` with `subspace`: the share of the basis's span captured (0-1)."""
    c = principal_cosines(basis, subspace)
    r = len(orthonormal(basis))
    return float((c ** 2).sum() / r) if r else 0.0


def decomposition(directions: np.ndarray, bases: Sequence[np.ndarray]) -> np.ndarray:
    """(K, G) share of each direction's in-span part that each basis carries, when the bases overlap.

    The direction's projection on the union of the spans is written as a sum of one vector per
    basis (least squares on the stacked bases), and each share is that vector's squared length over
    the sum of them all. A direction inside one span gets share 1 there even if the spans are not
    orthogonal; for orthogonal bases the shares are `composition` rescaled to sum to 1.
    """
    u = np.asarray(directions, np.float64)
    if not len(bases):
        return np.zeros((len(u), 0))
    a = np.concatenate([np.asarray(b, np.float64) for b in bases]).T  # (d, R)
    coef, *_ = np.linalg.lstsq(a, u.T, rcond=None)  # (R, K)
    parts, start = [], 0
    for b in bases:
        r = len(b)
        parts.append(((np.asarray(b, np.float64).T @ coef[start:start + r]) ** 2).sum(0))
        start += r
    e = np.stack(parts, 1)
    total = e.sum(1, keepdims=True)
    return np.where(total > 0, e / np.maximum(total, 1e-300), 0.0)
