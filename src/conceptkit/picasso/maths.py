"""Picasso's array maths: spatial activation maps to one size, PCA, fuzzy c-means (and a
k-means baseline), centres back to maps, per-pixel segmentation.

Model-free: plain numpy (and torch only for interpolation). The neuron selection and
timestep-similarity maths live in `conceptkit.picasso.groups` and are re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from conceptkit.errors import UsageError
from conceptkit.picasso.groups import (
    HIGH_PASS_MODES,
    correlation_matrix,
    high_pass,
    jaccard_matrix,
    random_groups,
    timestep_groups,
)

__all__ = [
    "CLUSTERERS",
    "HIGH_PASS_MODES",
    "Clustering",
    "Projection",
    "centres_to_maps",
    "cluster_fcm",
    "cluster_kmeans",
    "correlation_matrix",
    "high_pass",
    "jaccard_matrix",
    "random_groups",
    "reduce_pca",
    "resize_maps",
    "segment",
    "timestep_groups",
]


def _as_array(x, name: str, ndim: int | None = None) -> np.ndarray:
    """Convert an array-like or torch tensor to float64 numpy, checking ndim."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if ndim is not None and a.ndim != ndim:
        raise UsageError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


# --------------------------------------------------------------------------- spatial maps


def resize_maps(
    maps_by_layer: Mapping[str, object] | Sequence[object],
    size: int | tuple[int, int],
    *,
    mode: str = "bilinear",
) -> np.ndarray:
    """Bring the spatial activation maps Fs of layers with different resolutions to one size and flatten them (Picasso, neuron features).

    Layers are concatenated in the order given (a dict's insertion order). Interpolation is
    `torch.nn.functional.interpolate` with `align_corners=False`; "bilinear" is antialiased
    when shrinking, "area" averages (best for integer shrink factors). A map already at
    `size` is copied unchanged.

    Args:
        maps_by_layer: per layer an array (n_l, H_l, W_l) of n_l neurons' maps (or one (H_l, W_l) map).
        size: target H (= W) or (H, W).
        mode: "bilinear" or "area".

    Returns:
        (sum n_l, H * W) float64, one flattened map per neuron.
    """
    if mode not in ("bilinear", "area"):
        raise UsageError(f"unknown resize mode {mode!r}; use 'bilinear' or 'area'")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise UsageError(f"map size must be positive, got {(h, w)}")
    layers = list(maps_by_layer.values()) if isinstance(maps_by_layer, Mapping) else list(maps_by_layer)
    if not layers:
        raise UsageError("no maps to resize")
    out = []
    for maps in layers:
        a = _as_array(maps, "maps")
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3:
            raise UsageError(f"each layer's maps must be (n, H, W), got shape {a.shape}")
        if a.shape[1:] != (h, w):
            t = torch.from_numpy(a)[:, None]  # (n, 1, H_l, W_l)
            if mode == "area":
                t = F.interpolate(t, size=(h, w), mode="area")
            else:
                shrink = a.shape[1] > h or a.shape[2] > w
                t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
            a = t[:, 0].numpy()
        out.append(a.reshape(len(a), h * w))
    return np.concatenate(out, axis=0)


class Projection(NamedTuple):
    """PCA-reduced points and the fitted PCA (a named tuple, so `z, pca = reduce_pca(...)` works)."""

    z: np.ndarray  # (n, dim) coordinates in the principal subspace
    pca: PCA  # fitted sklearn PCA; `pca.inverse_transform` maps back to (n, d)


def reduce_pca(x, dim: int, seed: int = 0) -> Projection:
    """Project points onto their top `dim` principal components (Picasso, dimensionality reduction before FCM).

    `dim` is clipped down to min(n, d), the most components PCA can return; dim < 1 is an
    error. sklearn's "auto" solver is used with `random_state=seed`, so results are
    deterministic for a given seed (randomised SVD for large inputs).

    Args:
        x: (n, d) points, e.g. (neurons, H*W) flattened activation maps.
        dim: number of components wanted.
        seed: random state for the randomised solver.
    """
    a = _as_array(x, "x", 2)
    if int(dim) != dim or dim < 1:
        raise UsageError(f"PCA dim must be a positive integer, got {dim}")
    dim = min(int(dim), *a.shape)
    if dim < 1:
        raise UsageError(f"cannot run PCA on an empty array of shape {a.shape}")
    pca = PCA(n_components=dim, random_state=seed)
    z = pca.fit_transform(a)
    return Projection(z=z, pca=pca)


def centres_to_maps(centres, pca: PCA | None, shape: tuple[int, int]) -> np.ndarray:
    """Map cluster centres from PCA space back to spatial maps (Picasso, visualising each concept cluster).

    Args:
        centres: (k, dim) cluster centres in PCA coordinates (or (k, H*W) if `pca` is None).
        pca: the PCA from `reduce_pca`, or None if the clustering ran on raw maps.
        shape: (H, W) of the flattened maps.

    Returns:
        (k, H, W) float64 maps.
    """
    c = _as_array(centres, "centres", 2)
    full = pca.inverse_transform(c) if pca is not None else c
    h, w = shape
    if full.shape[1] != h * w:
        raise UsageError(f"centres decode to {full.shape[1]} values, not {h}x{w} = {h * w}")
    return np.asarray(full, dtype=np.float64).reshape(len(c), h, w)


def segment(centre_maps) -> np.ndarray:
    """Per-pixel argmax over k spatial maps: pixel (i, j) belongs to the cluster whose map is largest there (Picasso, segmentation figure).

    Ties go to the lowest cluster id; NaN counts as -inf.

    Args:
        centre_maps: (k, H, W) one map per cluster.

    Returns:
        (H, W) int64 cluster ids.
    """
    a = _as_array(centre_maps, "centre_maps", 3)
    if a.shape[0] == 0:
        raise UsageError("segment needs at least one map")
    return np.argmax(np.nan_to_num(a, nan=-np.inf), axis=0).astype(np.int64)


# --------------------------------------------------------------------------- clustering


@dataclass(frozen=True, eq=False)
class Clustering:
    """A (fuzzy or hard) clustering of n points into k clusters."""

    centres: np.ndarray  # (k, d) cluster centres in the space that was clustered
    membership: np.ndarray  # (k, n) memberships, each column sums to 1 (one-hot for hard methods)
    labels: np.ndarray  # (n,) int64, argmax of each membership column
    fpc: float  # fuzzy partition coefficient sum(u^2)/n, in [1/k, 1]; 1 for hard methods
    n_iter: int  # iterations the algorithm ran
    seconds: float  # wall-clock time of the fit
    method: str = "fcm"  # "fcm" or "kmeans"

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.membership.shape[0])


def _check_inputs(x, k: int, m: float, error: float, maxiter: int) -> np.ndarray:
    """Validate the shared clusterer arguments and return x as float64 (n, d)."""
    a = _as_array(x, "x", 2)
    n = len(a)
    if not np.all(np.isfinite(a)):
        raise UsageError("x contains NaN or infinite values")
    if int(k) != k or not 2 <= k <= n:
        raise UsageError(f"k must be an integer with 2 <= k <= n = {n}, got {k}")
    if not m > 1.0:
        raise UsageError(f"the fuzzifier m must be > 1, got {m}")
    if not error > 0:
        raise UsageError(f"error must be > 0, got {error}")
    if int(maxiter) != maxiter or maxiter < 1:
        raise UsageError(f"maxiter must be a positive integer, got {maxiter}")
    return a


def cluster_fcm(
    x, k: int, *, m: float = 2.0, seed: int = 0, error: float = 1e-5, maxiter: int = 1000
) -> Clustering:
    """Fuzzy c-means (Bezdek 1981) via `skfuzzy.cluster.cmeans` (Picasso, clustering neurons' activation maps).

    skfuzzy wants data as (features, samples) and, given `seed`, reseeds numpy's global RNG.
    Here the initial memberships come from a private `np.random.default_rng(seed)` and are
    passed as `init`, and the global RNG state is saved and restored around the call, so
    callers' random streams are untouched. skfuzzy returns centres computed from the
    previous iteration's memberships; the centres here are recomputed from the final ones,
    c_j = sum_i u_ji^m x_i / sum_i u_ji^m, so centres, memberships and labels agree.
    FCM is known to pull centres to the grand mean in high dimension: reduce with PCA first.

    Args:
        x: (n, d) points, one per row.
        k: number of clusters, 2 <= k <= n.
        m: fuzzifier, > 1 (2 is standard; larger = fuzzier).
        seed: seed for the initial memberships.
        error: stop when the Frobenius norm of the membership change is below this.
        maxiter: iteration cap.
    """
    import skfuzzy  # local: an import-time cost only the clustering stage pays

    a = _check_inputs(x, k, m, error, maxiter)
    k = int(k)
    u0 = np.random.default_rng(seed).random((k, len(a)))
    u0 /= u0.sum(axis=0, keepdims=True)
    state = np.random.get_state()
    t0 = time.perf_counter()
    try:
        _, u, _, _, _, n_iter, _ = skfuzzy.cluster.cmeans(
            a.T, k, m, error=error, maxiter=int(maxiter), init=u0
        )
    finally:
        np.random.set_state(state)
    seconds = time.perf_counter() - t0
    u = u / u.sum(axis=0, keepdims=True)
    um = u**m
    centres = (um @ a) / um.sum(axis=1, keepdims=True)
    return Clustering(
        centres=centres,
        membership=u,
        labels=np.argmax(u, axis=0).astype(np.int64),
        fpc=float(np.sum(u**2) / len(a)),
        n_iter=int(n_iter),
        seconds=seconds,
        method="fcm",
    )


def cluster_kmeans(
    x, k: int, *, m: float = 2.0, seed: int = 0, error: float = 1e-5, maxiter: int = 1000
) -> Clustering:
    """Hard k-means (Lloyd; scikit-learn, k-means++ init, 10 restarts): the baseline for `cluster_fcm`, same signature.

    `m` is accepted for interchangeability and ignored; `error` is sklearn's `tol` (relative
    to the data's variance) and `maxiter` its `max_iter`. Memberships are one-hot, so fpc = 1.

    Args:
        x: (n, d) points, one per row.
        k: number of clusters, 2 <= k <= n.
        m: ignored.
        seed: sklearn `random_state`.
        error: convergence tolerance.
        maxiter: iteration cap per restart.
    """
    a = _check_inputs(x, k, m, error, maxiter)
    k = int(k)
    t0 = time.perf_counter()
    km = KMeans(n_clusters=k, n_init=10, random_state=seed, tol=error, max_iter=int(maxiter)).fit(a)
    seconds = time.perf_counter() - t0
    labels = km.labels_.astype(np.int64)
    u = np.zeros((k, len(a)))
    u[labels, np.arange(len(a))] = 1.0
    return Clustering(
        centres=np.asarray(km.cluster_centers_, dtype=np.float64),
        membership=u,
        labels=labels,
        fpc=1.0,
        n_iter=int(km.n_iter_),
        seconds=seconds,
        method="kmeans",
    )


CLUSTERERS: dict[str, Callable[..., Clustering]] = {"fcm": cluster_fcm, "kmeans": cluster_kmeans}
"""Interchangeable clusterers by name, each `(x, k, *, m, seed, error, maxiter) -> Clustering`."""
