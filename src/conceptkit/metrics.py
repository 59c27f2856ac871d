"""Metric maths on plain arrays: Fréchet distance, diversity, Vendi score, CLIP score, cluster quality,
slider orthogonality and effect size, normalised entropy, paired bootstrap intervals of their ratios.

Model-free: every function takes `np.ndarray` (or a CPU/GPU `torch.Tensor`, converted to
float64 numpy) and returns plain floats, arrays or a frozen dataclass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.spatial.distance import pdist, squareform
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from conceptkit.errors import UsageError

__all__ = [
    "ClusterScores",
    "clip_score",
    "cluster_scores",
    "effect_cosines",
    "effect_size",
    "frechet_distance",
    "mean_pairwise_distance",
    "normalised_entropy",
    "paired_bootstrap",
    "resample_counts",
    "resampled_clip_score",
    "resampled_mean_pairwise_distance",
    "resampled_vendi_score",
    "vendi_score",
]


def _as_array(x, name: str, ndim: int | None = None) -> np.ndarray:
    """Convert an array-like or torch tensor to a float64 numpy array, checking ndim."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if ndim is not None and a.ndim != ndim:
        raise UsageError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    """L2-normalise the rows of x; a zero row is an error (its direction is undefined)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise UsageError(f"{name} has an all-zero row; its cosine similarity is undefined")
    return x / norms


def _cosine_matrix(x: np.ndarray) -> np.ndarray:
    """Pairwise cosine matrix; a zero row has cosine 0 with every other row and 1 with itself."""
    norms = np.linalg.norm(x, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    u = x / safe[:, None]
    c = np.clip(u @ u.T, -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    return c


# --------------------------------------------------------------------------- distributions


def frechet_distance(x, y, *, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, the FID formula).

    d^2 = ||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)). The matrix square root uses
    `scipy.linalg.sqrtm`; if it is not finite (near-singular product, e.g. fewer samples than
    features) it is retried with `eps` added to both diagonals, as pytorch-fid does. The
    imaginary part left by round-off is dropped, and tiny negative results are clipped to 0.

    Args:
        x: (n, d) features of the first set, one sample per row; n >= 2.
        y: (m, d) features of the second set; m >= 2.
        eps: diagonal offset for the fallback square root.
    """
    x = _as_array(x, "x", 2)
    y = _as_array(y, "y", 2)
    if x.shape[1] != y.shape[1]:
        raise UsageError(f"feature sizes differ: x has {x.shape[1]}, y has {y.shape[1]}")
    if len(x) < 2 or len(y) < 2:
        raise UsageError("frechet_distance needs at least 2 samples in each set")
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    s1 = np.atleast_2d(np.cov(x, rowvar=False))
    s2 = np.atleast_2d(np.cov(y, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # singular-matrix chatter; we check
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.all(np.isfinite(covmean)):
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    d2 = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(d2, 0.0)


# --------------------------------------------------------------------------- diversity


def mean_pairwise_distance(x, metric: str = "cosine") -> float:
    """Mean distance over all unordered pairs of rows, a diversity measure (SliderSpace, Gandikota et al. 2025, diversity evaluation).

    Args:
        x: (n, d) embeddings, n >= 2.
        metric: any `scipy.spatial.distance.pdist` metric ("cosine" = 1 - cosine similarity,
            "euclidean", ...).
    """
    x = _as_array(x, "x", 2)
    if len(x) < 2:
        raise UsageError("mean_pairwise_distance needs at least 2 rows")
    try:
        return float(np.mean(pdist(x, metric=metric)))
    except ValueError as e:
        raise UsageError(f"bad metric {metric!r}: {e}") from None


def vendi_score(x) -> float:
    """Vendi score with a cosine kernel: exp of the Shannon entropy of eig(K / n) (Friedman & Dieng 2023, order q = 1).

    Rows are L2-normalised, so K_ij is the cosine similarity. n identical items score 1;
    n mutually orthogonal items score n. The eigenvalues are taken from the smaller of the
    (n, n) and (d, d) Gram matrices (they share their non-zero spectrum).

    Args:
        x: (n, d) embeddings, no all-zero row.
    """
    x = _as_array(x, "x", 2)
    n = len(x)
    if n == 0:
        raise UsageError("vendi_score needs at least 1 row")
    u = _unit_rows(x, "x")
    gram = (u @ u.T) if n <= u.shape[1] else (u.T @ u)
    lam = np.linalg.eigvalsh(gram / n)
    lam = lam[lam > 1e-12]
    return float(np.exp(-np.sum(lam * np.log(lam))))


def normalised_entropy(labels, n_classes: int) -> float:
    """Shannon entropy of the label histogram divided by log(n_classes): 0 = one class, 1 = uniform.

    Used for the diversity of the toy model's unsaid factors (SliderSpace, Gandikota et al.
    2025, diversity of generations).

    Args:
        labels: (n,) integer class ids in [0, n_classes).
        n_classes: the number of possible classes, >= 2.
    """
    if n_classes < 2:
        raise UsageError(f"n_classes must be >= 2, got {n_classes}")
    lab = np.asarray(labels).ravel()
    if lab.size == 0:
        raise UsageError("normalised_entropy needs at least one label")
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.equal(np.mod(lab, 1), 0)):
            raise UsageError("labels must be integers")
        lab = lab.astype(np.int64)
    if lab.min() < 0 or lab.max() >= n_classes:
        raise UsageError(f"labels must lie in [0, {n_classes}), got [{lab.min()}, {lab.max()}]")
    p = np.bincount(lab, minlength=n_classes) / lab.size
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)) / math.log(n_classes))


# --------------------------------------------------------------------------- text alignment


def clip_score(image_emb, text_emb, *, scale: float = 100.0) -> float:
    """Mean CLIP score, scale * max(cos(image, text), 0), as torchmetrics' CLIPScore (Hessel et al. 2021).

    The convention is torchmetrics' (scale 100, negatives clamped to 0); Hessel et al. use
    scale 2.5 instead. Embeddings are L2-normalised here, so raw projections are fine.

    Args:
        image_emb: (n, d) image embeddings.
        text_emb: (n, d) paired text embeddings, or (d,) / (1, d) one text for every image.
        scale: multiplier on the cosine.
    """
    img = _as_array(image_emb, "image_emb", 2)
    txt = _as_array(text_emb, "text_emb")
    if txt.ndim == 1:
        txt = txt[None, :]
    if txt.ndim != 2 or txt.shape[1] != img.shape[1]:
        raise UsageError(f"text_emb shape {txt.shape} does not match image_emb shape {img.shape}")
    if len(txt) not in (1, len(img)):
        raise UsageError(f"need 1 or {len(img)} text embeddings, got {len(txt)}")
    if len(img) == 0:
        raise UsageError("clip_score needs at least one image")
    cos = np.sum(_unit_rows(img, "image_emb") * _unit_rows(txt, "text_emb"), axis=1)
    return float(scale * np.mean(np.maximum(cos, 0.0)))


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True)
class ClusterScores:
    """Cluster-quality scores; a score is None where it is undefined."""

    calinski_harabasz: float | None  # higher is better; None if fewer than 2 or more than n-1 labels
    davies_bouldin: float | None  # lower is better; same condition
    silhouette: float | None  # in [-1, 1], higher is better; same condition
    fpc: float | None  # fuzzy partition coefficient in [1/k, 1]; None without memberships


def cluster_scores(
    features, labels, membership=None, *, sample_size: int | None = None, seed: int = 0
) -> ClusterScores:
    """Calinski-Harabasz, Davies-Bouldin and silhouette on hard labels (scikit-learn) and Bezdek's (1981) partition coefficient.

    FPC = sum_ij u_ij^2 / n from the (k, n) membership matrix: 1 for a crisp partition, 1/k
    for memberships that are all equal (Picasso uses it to judge the fuzzy clustering).

    Args:
        features: (n, d) the clustered points.
        labels: (n,) hard cluster ids (e.g. `Clustering.labels`, the argmax of memberships).
        membership: optional (k, n) fuzzy memberships, columns summing to 1.
        sample_size: if set, the silhouette is estimated on this many random points (O(n^2)).
        seed: random state for that sample.
    """
    x = _as_array(features, "features", 2)
    lab = np.asarray(labels).ravel()
    n = len(x)
    if lab.shape[0] != n:
        raise UsageError(f"{lab.shape[0]} labels for {n} feature rows")
    n_labels = len(np.unique(lab))
    ch = db = sil = None
    if 2 <= n_labels <= n - 1:
        ch = float(calinski_harabasz_score(x, lab))
        db = float(davies_bouldin_score(x, lab))
        size = None if sample_size is None or sample_size >= n else sample_size
        sil = float(silhouette_score(x, lab, sample_size=size, random_state=seed))
    fpc = None
    if membership is not None:
        u = _as_array(membership, "membership", 2)
        if u.shape[1] != n:
            raise UsageError(f"membership must be (k, {n}), got {u.shape}")
        fpc = float(np.sum(u**2) / n)
    return ClusterScores(calinski_harabasz=ch, davies_bouldin=db, silhouette=sil, fpc=fpc)


# --------------------------------------------------------------------------- sliders


def effect_cosines(effects) -> np.ndarray:
    """Pairwise cosine similarity of per-slider mean effect vectors: ~0 off the diagonal means orthogonal sliders (SliderSpace, Gandikota et al. 2025).

    A slider with a zero effect has cosine 0 with the others (and 1 with itself).

    Args:
        effects: (S, d) one mean effect vector per slider, or (S, n, d) per-sample effects,
            averaged over n first.

    Returns:
        (S, S) symmetric matrix with ones on the diagonal.
    """
    e = _as_array(effects, "effects")
    if e.ndim == 3:
        e = e.mean(axis=1)
    if e.ndim != 2:
        raise UsageError(f"effects must be (S, d) or (S, n, d), got shape {e.shape}")
    return _cosine_matrix(e)


def effect_size(before, after, *, standardise: bool = False) -> float:
    """Mean L2 norm of the per-sample embedding shift ||after_i - before_i|| (SliderSpace, Gandikota et al. 2025).

    With `standardise=True` the mean shift is divided by the RMS spread of `before` around
    its mean, sqrt(trace Cov(before)) (population covariance): the shift in units of the
    baseline's own variability, comparable across encoders.

    Args:
        before: (n, d) embeddings without the edit (same seeds as `after`).
        after: (n, d) embeddings with the edit, row i paired with row i of `before`.
        standardise: divide by the spread of `before`.
    """
    b = _as_array(before, "before", 2)
    a = _as_array(after, "after", 2)
    if a.shape != b.shape:
        raise UsageError(f"before {b.shape} and after {a.shape} must have the same shape")
    if len(b) == 0:
        raise UsageError("effect_size needs at least one pair")
    shift = float(np.mean(np.linalg.norm(a - b, axis=1)))
    if not standardise:
        return shift
    if len(b) < 2:
        raise UsageError("a standardised effect size needs at least 2 pairs")
    spread = float(np.sqrt(np.sum(np.var(b, axis=0))))
    if spread == 0:
        raise UsageError("the 'before' embeddings are all identical; cannot standardise")
    return shift / spread


# --------------------------------------------------------------------------- paired bootstrap
# The `resampled_*` statistics are the plain metric on each resample's multiset of rows, duplicates
# kept (= e.g. `mean_pairwise_distance(x[idx])`), for all resamples at once from matrices built once.


def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n): counts[r, i] = how often resample r drew row i; the draws are `default_rng(seed).integers(0, n, (n_boot, n))`."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n), dtype=np.int64)
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1)
    return counts


def resampled_mean_pairwise_distance(x, counts, metric: str = "cosine") -> np.ndarray:
    """`mean_pairwise_distance` of each resample's multiset of rows, (n_boot,).

    A row drawn twice makes a pair at distance 0 that counts like any other pair: the mean is over
    all m(m-1)/2 pairs of the m drawn rows, i.e. w^T D w / (m(m-1)) with D's diagonal 0.
    """
    x = _as_array(x, "x", 2)
    try:
        dist = squareform(pdist(x, metric=metric))
    except ValueError as e:
        raise UsageError(f"bad metric {metric!r}: {e}") from None
    w = np.asarray(counts, dtype=np.float64)
    m = w.sum(axis=1)
    return np.einsum("bi,ij,bj->b", w, dist, w) / (m * (m - 1))


def resampled_vendi_score(x, counts, *, chunk: int = 128) -> np.ndarray:
    """`vendi_score` of each resample's multiset of rows, (n_boot,).

    The kernel of the drawn rows, K[idx][:, idx], has the non-zero spectrum of W^1/2 K W^1/2 (n, n)
    and of U^T W U (d, d), W = diag(counts); the smaller one is used, in batches of `chunk`.
    """
    u = _unit_rows(_as_array(x, "x", 2), "x")
    w = np.asarray(counts, dtype=np.float64)
    out = np.empty(len(w))
    small_n = u.shape[0] <= u.shape[1]
    kernel = u @ u.T if small_n else None
    for s in range(0, len(w), chunk):
        c = w[s:s + chunk]
        if small_n:
            r = np.sqrt(c)
            mats = r[:, :, None] * kernel[None] * r[:, None, :]
        else:
            mats = np.einsum("bi,id,ie->bde", c, u, u)
        lam = np.linalg.eigvalsh(mats / c.sum(axis=1)[:, None, None])
        lam = np.where(lam > 1e-12, lam, 1.0)  # log(1) = 0: dropped, as in vendi_score
        out[s:s + chunk] = np.exp(-np.sum(lam * np.log(lam), axis=1))
    return out


def resampled_clip_score(x, text_emb, counts, *, scale: float = 100.0) -> np.ndarray:
    """`clip_score` of each resample's multiset of rows against one text, (n_boot,)."""
    img = _as_array(x, "x", 2)
    txt = _as_array(text_emb, "text_emb").reshape(1, -1)
    if txt.shape[1] != img.shape[1]:
        raise UsageError(f"text_emb shape {txt.shape} does not match image_emb shape {img.shape}")
    per_row = scale * np.maximum(np.sum(_unit_rows(img, "x") * _unit_rows(txt, "text_emb"), axis=1), 0.0)
    w = np.asarray(counts, dtype=np.float64)
    return w @ per_row / w.sum(axis=1)


def paired_bootstrap(a, b, stat: Callable[[np.ndarray, np.ndarray], np.ndarray], *, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of stat(b) / stat(a) over paired bootstrap resamples (Efron & Tibshirani 1993).

    Row i of `a` and row i of `b` belong together (the same seed), so each resample draws n row
    indices with replacement and uses the same ones on both sides (`resample_counts(n, n_boot,
    seed)`). Each side's statistic is computed on its multiset of drawn rows, duplicates kept (a
    duplicate pair has distance 0, so the mean pairwise distance of a resample is biased low by about
    1/n); the bias is the same on both sides, so the ratio is not. For a relative change
    stat(b) / stat(a) - 1, subtract 1 from both ends: percentiles commute with that. Resamples where
    stat(a) is 0 have no ratio and are left out; None if every one is.

    Args:
        a, b: (n, d) paired rows, n >= 2.
        stat: (x, counts) -> (n_boot,) the statistic of each resample of x, e.g.
            `resampled_mean_pairwise_distance` or `lambda x, c: resampled_clip_score(x, text, c)`.
        n_boot: number of resamples.
        seed: seeds the resampling; the interval is reproducible.
        level: coverage; the ends are numpy's (linear) percentiles 100(1-level)/2 and 100(1+level)/2.
    """
    a = _as_array(a, "a", 2)
    b = _as_array(b, "b", 2)
    if a.shape[0] != b.shape[0] or a.shape[0] < 2:
        raise UsageError(f"paired_bootstrap needs the same number (>= 2) of rows in a and b, got {a.shape} and {b.shape}")
    if n_boot < 1 or not 0 < level < 1:
        raise UsageError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot} and {level}")
    counts = resample_counts(len(a), n_boot, seed)
    sa, sb = np.asarray(stat(a, counts), dtype=np.float64), np.asarray(stat(b, counts), dtype=np.float64)
    ok = sa != 0
    if not ok.any():
        return None
    ratio = sb[ok] / sa[ok]
    lo, hi = np.percentile(ratio, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
