"""Neuron selection and similarity maths for Picasso: timestep groups, the high-pass filter,
timestep-similarity matrices and random neuron groups.

A *neuron* is one output channel (weight row) of a cross-attention key or value projection
in the UNet. Model-free: plain numpy in, numpy out. `conceptkit.picasso.maths` re-exports these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conceptkit.diffusion import timestep_groups  # noqa: F401  one grouping for Picasso and implant
from conceptkit.errors import UsageError

__all__ = [
    "HIGH_PASS_MODES",
    "correlation_matrix",
    "high_pass",
    "jaccard_matrix",
    "random_groups",
    "timestep_groups",
]

HIGH_PASS_MODES = ("quantile", "relative", "absolute")


def high_pass(importance, tau: float, mode: str = "quantile", *, axis: int | None = -1) -> np.ndarray:
    """Keep the neurons whose importance passes a threshold (Picasso's high-pass filter on neuron importance).

    Modes:
        quantile: keep importance >= the tau-quantile (so about a (1 - tau) share is kept);
        relative: keep importance >= tau * max;
        absolute: keep importance >= tau.
    Quantile and maximum are taken along `axis` (default: the last, i.e. per timestep for a
    (T, N) array; None = over the whole array). NaN importances are never kept.

    Args:
        importance: (..., N) importance scores, e.g. (T, N) timesteps x neurons.
        tau: threshold; 0 <= tau < 1 for "quantile" and "relative", any finite number for "absolute".
        mode: "quantile", "relative" or "absolute".
        axis: axis the threshold is computed along.

    Returns:
        boolean mask with the shape of `importance`.
    """
    if mode not in HIGH_PASS_MODES:
        raise UsageError(f"unknown high-pass mode {mode!r}; use one of {', '.join(HIGH_PASS_MODES)}")
    tau = float(tau)
    if not np.isfinite(tau):
        raise UsageError(f"tau must be finite, got {tau}")
    if mode != "absolute" and not 0.0 <= tau < 1.0:
        raise UsageError(f"tau must satisfy 0 <= tau < 1 for mode {mode!r}, got {tau}")
    if hasattr(importance, "detach"):
        importance = importance.detach().float().cpu().numpy()
    a = np.asarray(importance, dtype=np.float64)
    if a.size == 0:
        raise UsageError("importance is empty")
    if mode == "absolute":
        thr = tau
    elif np.all(np.isnan(a)):
        return np.zeros(a.shape, dtype=bool)
    elif mode == "quantile":
        thr = np.nanquantile(a, tau, axis=axis, keepdims=True)
    else:
        thr = tau * np.nanmax(a, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore"):
        return a >= thr


def jaccard_matrix(masks) -> np.ndarray:
    """Jaccard similarity |A & B| / |A | B| between the selected-neuron sets of every pair of timesteps (Picasso, timestep similarity heatmap).

    Two empty sets count as identical (similarity 1), so the diagonal is always 1.

    Args:
        masks: (T, N) boolean, row t = the neurons selected at timestep (group) t.

    Returns:
        (T, T) symmetric float64 matrix in [0, 1].
    """
    m = np.asarray(masks)
    if m.ndim != 2:
        raise UsageError(f"masks must be (T, N), got shape {m.shape}")
    m = m.astype(bool).astype(np.float64)
    inter = m @ m.T
    sizes = m.sum(axis=1)
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.where(union > 0, inter / union, 1.0)
    return j


def correlation_matrix(weights) -> np.ndarray:
    """Pearson correlation across neurons between every pair of timesteps' importance vectors (Picasso, timestep similarity heatmap).

    A constant row (no variance) has correlation 0 with every other row and 1 with itself,
    instead of NaN.

    Args:
        weights: (T, N) importance (or activation) per timestep and neuron, N >= 2.

    Returns:
        (T, T) symmetric float64 matrix in [-1, 1] with ones on the diagonal.
    """
    if hasattr(weights, "detach"):
        weights = weights.detach().float().cpu().numpy()
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise UsageError(f"weights must be (T, N), got shape {w.shape}")
    if w.shape[1] < 2:
        raise UsageError("correlation needs at least 2 neurons per row")
    c = w - w.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(c, axis=1)
    # a row is constant if its spread is at round-off level relative to its magnitude
    scale = np.maximum(np.abs(w).max(axis=1), 1e-300)
    const = norms <= 1e-12 * scale * np.sqrt(w.shape[1])
    u = np.where(const[:, None], 0.0, c / np.where(const, 1.0, norms)[:, None])
    r = np.clip(u @ u.T, -1.0, 1.0)
    np.fill_diagonal(r, 1.0)
    return r


def random_groups(n: int, sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Disjoint random neuron groups of the given sizes: the baseline Picasso's visual clusters must beat.

    Args:
        n: number of neurons to draw from (ids 0..n-1).
        sizes: (k,) group sizes, each >= 0, summing to at most n (e.g. the sizes of the
            real clusters, `np.bincount(clustering.labels)`).
        seed: seed of a private `np.random.default_rng`; the global RNG is untouched.

    Returns:
        k sorted int64 arrays of neuron ids, group i with sizes[i] elements.
    """
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes):
        raise UsageError(f"group sizes must be >= 0, got {sizes}")
    if sum(sizes) > n:
        raise UsageError(f"group sizes sum to {sum(sizes)}, more than the {n} neurons available")
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(perm[bounds[i] : bounds[i + 1]]).astype(np.int64) for i in range(len(sizes))]
