"""Picasso's cluster stage: from per-timestep concept-neuron statistics to k fuzzy sub-concepts.

Cai, Wang, Zhou, Lou, "Picasso: Exploring a Parameter Analysis Approach from the Temporal-Spatial
Perspective for Text-to-Image Diffusion Models". Steps: split the timesteps into D groups
(temporal extension dimension); per group keep the neurons whose importance passes the
high-pass filter (TSCones); their mean spatial activation maps Fs, resized to one size, made
absolute and unit-norm, reduced by PCA, clustered by fuzzy c-means into k sub-concepts; scored
by Calinski-Harabasz, Davies-Bouldin, silhouette and FPC; centres mapped back to spatial maps and
a per-pixel segmentation; and timestep x timestep similarity maps per sub-concept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from conceptkit import store
from conceptkit.picasso.maths import (
    HIGH_PASS_MODES,
    Clustering,
    centres_to_maps,
    cluster_fcm,
    correlation_matrix,
    high_pass,
    jaccard_matrix,
    reduce_pca,
    resize_maps,
    segment,
    timestep_groups,
)
from conceptkit.errors import UsageError
from conceptkit.metrics import ClusterScores, cluster_scores
from conceptkit.picasso.neurons import NeuronStats

CLUSTER_FORMAT = 1
SWEEPABLE = ("k", "tau", "temporal_dim")


@dataclass(frozen=True)
class ClusterConfig:
    """Settings of one Picasso clustering."""

    tau: float = 0.9  # high-pass threshold: keep importance >= the tau-quantile (per timestep group)
    tau_mode: str = "quantile"  # quantile | relative (tau x max) | absolute
    k: int = 4  # sub-concepts (FCM clusters); the paper's elbow is at 3-4
    temporal_dim: int = 3  # D timestep groups, group of t = int(t * D / 1000); the paper's best is 3
    pca_dim: int = 8  # PCA components the maps are reduced to before FCM
    fuzziness: float = 2.0  # FCM fuzzifier m > 1
    seed: int = 0  # FCM initial memberships and the PCA solver
    map_size: int | None = None  # side the Fs maps are resized to; None: the largest layer's
    top: int = 5  # neurons listed per cluster

    def __post_init__(self) -> None:
        if self.tau_mode not in HIGH_PASS_MODES:
            raise UsageError(f"--tau-mode must be one of {', '.join(HIGH_PASS_MODES)} (got {self.tau_mode!r})")
        if not np.isfinite(self.tau) or (self.tau_mode != "absolute" and not 0.0 <= self.tau < 1.0):
            raise UsageError(f"--tau must satisfy 0 <= tau < 1 (got {self.tau})")
        if self.k < 2:
            raise UsageError(f"--k must be at least 2 (got {self.k})")
        if self.temporal_dim < 1:
            raise UsageError(f"--temporal-dim must be at least 1 (got {self.temporal_dim})")
        if self.pca_dim < 1:
            raise UsageError(f"--pca-dim must be at least 1 (got {self.pca_dim})")
        if not self.fuzziness > 1.0:
            raise UsageError(f"--fuzziness must be greater than 1 (got {self.fuzziness})")
        if self.map_size is not None and self.map_size < 1:
            raise UsageError(f"--map-size must be at least 1 (got {self.map_size})")
        if self.top < 1:
            raise UsageError(f"--top must be at least 1 (got {self.top})")


@dataclass(frozen=True)
class Selection:
    """The kept (timestep group, neuron) items and their resized maps."""

    group: np.ndarray  # (n,) timestep group of each item
    neuron: np.ndarray  # (n,) flat neuron index (see NeuronStats.blocks)
    importance: np.ndarray  # (n,) mean importance over the group's steps
    maps: np.ndarray  # (n, S*S) |Fs| resized and unit-normalised: what PCA sees
    shape: tuple[int, int]  # (S, S)
    groups: np.ndarray  # (T,) group of each step


@dataclass(frozen=True)
class Similarity:
    """Timestep x timestep similarity of the concept neurons, overall and per sub-concept."""

    jaccard: np.ndarray  # (T, T) Jaccard of the kept neuron sets of two steps
    cluster_jaccard: np.ndarray  # (k, T, T) the same, restricted to each sub-concept's neurons
    cluster_correlation: np.ndarray  # (k, T, T) correlation of its neurons' weights (importance x activation)


@dataclass(frozen=True)
class Picasso:
    """One clustering and everything needed to read and check it."""

    config: ClusterConfig
    selection: Selection
    features: np.ndarray  # (n, d) after PCA: what FCM clustered
    clustering: Clustering
    scores: ClusterScores
    centre_maps: np.ndarray  # (k, S, S)
    segmentation: np.ndarray  # (S, S)
    similarity: Similarity | None


@dataclass(frozen=True)
class SweepPoint:
    value: float
    n_kept: int
    scores: ClusterScores | None
    seconds: float  # FCM wall time
    error: str | None = None


# ---------------------------------------------------------------- selection


def select(stats: NeuronStats, cfg: ClusterConfig) -> Selection:
    """TSCones: per timestep group, the neurons past the high-pass filter, with their mean |Fs| maps."""
    num_train = int(stats.manifest.get("num_train_timesteps", 1000))
    groups = timestep_groups(stats.timesteps, cfg.temporal_dim, num_train)
    empty = [g for g in range(cfg.temporal_dim) if not np.any(groups == g)]
    if empty:
        raise UsageError(
            f"timestep group(s) {empty} of --temporal-dim {cfg.temporal_dim} hold no harvested step "
            f"({len(stats.timesteps)} steps); use a smaller --temporal-dim or more --steps"
        )
    size = cfg.map_size or max(b.height for b in stats.blocks)
    parts_g, parts_n, parts_i, parts_m = [], [], [], []
    for g in range(cfg.temporal_dim):
        steps = np.flatnonzero(groups == g)
        imp = stats.importance[steps].mean(0)
        keep = np.flatnonzero(high_pass(imp, cfg.tau, cfg.tau_mode, axis=None))
        if not len(keep):
            continue
        # mean Fs over the group's steps, for the kept neurons only (memory stays bounded)
        sums: list[np.ndarray] | None = None
        for s in steps:
            maps = stats.maps(int(s))
            sums = maps if sums is None else [a + b for a, b in zip(sums, maps, strict=True)]
        layers = []
        for b, block_maps in zip(stats.blocks, sums, strict=True):
            inside = keep[(keep >= b.start) & (keep < b.stop)]
            if len(inside):
                layers.append(block_maps[inside - b.start] / len(steps))
        parts_g.append(np.full(len(keep), g))
        parts_n.append(keep)
        parts_i.append(imp[keep])
        parts_m.append(resize_maps(layers, size))
    if not parts_g:
        raise UsageError(f"no neuron passes --tau {cfg.tau} ({cfg.tau_mode}); lower --tau")
    maps = np.abs(np.concatenate(parts_m))
    norms = np.linalg.norm(maps, axis=1, keepdims=True)
    maps = maps / np.where(norms > 0, norms, 1.0)
    return Selection(np.concatenate(parts_g), np.concatenate(parts_n), np.concatenate(parts_i), maps, (size, size), groups)


# ---------------------------------------------------------------- clustering


def _fit(sel: Selection, cfg: ClusterConfig) -> tuple[np.ndarray, Clustering, Any]:
    n = len(sel.neuron)
    if cfg.k > n:
        raise UsageError(f"--k {cfg.k} is more than the {n} neurons kept at --tau {cfg.tau}; lower --k or --tau")
    z, pca = reduce_pca(sel.maps, cfg.pca_dim, seed=cfg.seed)
    return z, cluster_fcm(z, cfg.k, m=cfg.fuzziness, seed=cfg.seed), pca


def similarity(stats: NeuronStats, sel: Selection, labels: np.ndarray, cfg: ClusterConfig) -> Similarity:
    """Timestep similarity maps (Picasso's heatmaps): Jaccard of per-step kept sets, and per sub-concept the
    correlation across steps of its neurons' weights, importance x activation."""
    kept = high_pass(stats.importance, cfg.tau, cfg.tau_mode, axis=-1)  # (T, N) per step
    weights = stats.importance * stats.activation
    t = len(stats.timesteps)
    cj, cc = np.zeros((cfg.k, t, t)), np.zeros((cfg.k, t, t))
    for c in range(cfg.k):
        ids = np.unique(sel.neuron[labels == c])
        cj[c] = jaccard_matrix(kept[:, ids]) if len(ids) else np.eye(t)
        cc[c] = correlation_matrix(weights[:, ids]) if len(ids) >= 2 else np.eye(t)
    return Similarity(jaccard_matrix(kept), cj, cc)


def cluster(stats: NeuronStats, cfg: ClusterConfig, *, with_similarity: bool = True) -> Picasso:
    """Run Picasso on loaded statistics: select, PCA, FCM, scores, centre maps, segmentation, similarity."""
    sel = select(stats, cfg)
    z, fit, pca = _fit(sel, cfg)
    scores = cluster_scores(z, fit.labels, fit.membership)
    centre_maps = centres_to_maps(fit.centres, pca, sel.shape)
    sim = similarity(stats, sel, fit.labels, cfg) if with_similarity else None
    return Picasso(cfg, sel, z, fit, scores, centre_maps, segment(centre_maps), sim)


MAX_SWEEP_POINTS = 64  # one clustering per value


def parse_range(text: str, what: str, integer: bool) -> list[float]:
    """'2:8' -> 2..8 (integers, inclusive); '0.5:0.95:10' -> 10 evenly spaced values; '3' -> [3]."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise UsageError(f"--sweep-{what} takes START:STOP[:COUNT], e.g. 2:8 (got {text!r})") from None
    if len(parts) == 1:
        parts = parts * 2
    if not all(np.isfinite(parts)):
        raise UsageError(f"--sweep-{what} takes finite numbers (got {text!r})")
    if len(parts) not in (2, 3) or parts[1] < parts[0]:
        raise UsageError(f"--sweep-{what} takes START:STOP[:COUNT] with STOP >= START (got {text!r})")
    if len(parts) == 3:
        if parts[2] < 1 or parts[2] != int(parts[2]):
            raise UsageError(f"--sweep-{what}: COUNT must be a positive integer (got {text!r})")
    n = parts[2] if len(parts) == 3 else parts[1] - parts[0] + 1 if integer else 0
    if n > MAX_SWEEP_POINTS:
        raise UsageError(f"--sweep-{what} {text!r} gives {n:,.0f} values; a sweep may have at most {MAX_SWEEP_POINTS}")
    if len(parts) == 3:
        values = list(np.linspace(parts[0], parts[1], int(parts[2])))
    elif integer:
        values = list(range(int(parts[0]), int(parts[1]) + 1))
    else:
        raise UsageError(f"--sweep-{what} needs a COUNT: START:STOP:COUNT (got {text!r})")
    if integer:
        values = sorted({int(round(v)) for v in values})
    return [round(float(v), 10) for v in values]


def sweep(stats: NeuronStats, cfg: ClusterConfig, param: str, values: Sequence[float],
          progress: Callable[[int, int], None] | None = None) -> list[SweepPoint]:
    """Cluster once per value of `param` (k, tau or temporal_dim), all else as in `cfg`; a point that
    cannot be computed (k > kept neurons, an empty group) records its error instead."""
    if param not in SWEEPABLE:
        raise UsageError(f"cannot sweep {param!r}; sweepable: {', '.join(SWEEPABLE)}")
    points: list[SweepPoint] = []
    sel_cache: Selection | None = None
    for i, v in enumerate(values):
        try:
            c = replace(cfg, **{param: int(v) if param != "tau" else float(v)})
            if param == "k" and sel_cache is not None:
                sel = sel_cache
            else:
                sel = select(stats, c)
                sel_cache = sel if param == "k" else None
            z, fit, _ = _fit(sel, c)
            points.append(SweepPoint(v, len(sel.neuron), cluster_scores(z, fit.labels, fit.membership), fit.seconds))
        except UsageError as exc:
            points.append(SweepPoint(v, 0, None, 0.0, str(exc)))
        if progress:
            progress(i + 1, len(values))
    return points


# ---------------------------------------------------------------- saving and reading back


def cluster_key(stats: NeuronStats, cfg: ClusterConfig) -> str:
    from dataclasses import asdict

    return store.make_key({"format": CLUSTER_FORMAT, "neurons": stats.key, "settings": asdict(cfg)})


def _save_npy(path: Path, array: np.ndarray) -> None:
    with store.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def neuron_name(stats: NeuronStats, neuron: int) -> str:
    """'up0.1.0.v#12': block short name and channel."""
    for b in stats.blocks:
        if b.start <= neuron < b.stop:
            return f"{b.short}#{neuron - b.start}"
    raise IndexError(neuron)


def cluster_rows(stats: NeuronStats, res: Picasso) -> list[dict[str, Any]]:
    """Per cluster: size, share per timestep group, share per layer, top neurons by importance."""
    sel, labels, cfg = res.selection, res.clustering.labels, res.config
    block_of = np.zeros(stats.n_neurons, dtype=np.int64)
    for i, b in enumerate(stats.blocks):
        block_of[b.start : b.stop] = i
    rows = []
    for c in range(cfg.k):
        idx = np.flatnonzero(labels == c)
        n = max(len(idx), 1)
        groups = {int(g): round(float(np.sum(sel.group[idx] == g)) / n, 4) for g in range(cfg.temporal_dim)}
        layer_counts: dict[str, int] = {}
        for bi in block_of[sel.neuron[idx]]:
            layer_counts[stats.blocks[bi].short] = layer_counts.get(stats.blocks[bi].short, 0) + 1
        layers = {name: round(cnt / n, 4) for name, cnt in sorted(layer_counts.items(), key=lambda kv: -kv[1])}
        top = idx[np.argsort(-sel.importance[idx])][: cfg.top]
        rows.append({
            "cluster": c, "size": len(idx), "group_share": groups, "layer_share": layers,
            "top_neurons": [f"{neuron_name(stats, int(sel.neuron[j]))}@g{int(sel.group[j])}" for j in top],
        })
    return rows


def save_cluster(stats: NeuronStats, res: Picasso, on_wait=None,
         figures: Callable[[Path], dict[str, str]] | None = None,
         describe: Callable[[str, Path, dict[str, str], dict[str, str]], dict[str, Any]] | None = None,
         ) -> tuple[str, Path, dict[str, str], dict[str, str]]:
    """Write a clustering as one artifact: (key, folder, {array: path}, {figure: path}).

    The arrays, the figures that `figures(folder)` draws into the folder it is given, and the
    manifest `describe(key, folder, arrays, figures)` returns are written into a temporary folder
    that is then renamed into place, so a kill leaves the old artifact or the new one, never a part.
    """
    key = cluster_key(stats, res.config)
    art = store.artifact("cluster", key)
    sel, fit = res.selection, res.clustering
    arrays = {
        "features": res.features, "labels": fit.labels, "membership": fit.membership, "centres": fit.centres,
        "centre_maps": res.centre_maps, "segmentation": res.segmentation, "item_group": sel.group,
        "item_neuron": sel.neuron, "item_importance": sel.importance, "timesteps": stats.timesteps,
    }
    if res.similarity is not None:
        arrays.update(similarity_jaccard=res.similarity.jaccard, similarity_cluster_jaccard=res.similarity.cluster_jaccard,
                      similarity_cluster_correlation=res.similarity.cluster_correlation)
    with art.lock(on_wait=on_wait):
        tmp = art.path.parent / f".tmp-{key}-{os.getpid()}"
        store.remove_tree(tmp)
        tmp.mkdir(parents=True)
        try:
            for name, a in arrays.items():
                _save_npy(tmp / f"{name}.npy", np.asarray(a))
            paths = {name: str(art.path / f"{name}.npy") for name in arrays}
            drawn = figures(tmp) if figures is not None else {}
            images = {name: str(art.path / Path(p).name) for name, p in drawn.items()}
            doc = describe(key, art.path, paths, images) if describe is not None else {}
            store.Artifact("cluster", key, tmp).write_manifest({"created": time.time(), "complete": True, **doc})
            store.publish(tmp, art.path)
        finally:
            store.remove_tree(tmp)  # already moved into place unless something failed
    return key, art.path, paths, images


def scores_dict(scores: ClusterScores | None, seconds: float) -> dict[str, float | None]:
    if scores is None:
        return {"calinski_harabasz": None, "davies_bouldin": None, "silhouette": None, "fpc": None, "seconds": seconds}
    return {"calinski_harabasz": scores.calinski_harabasz, "davies_bouldin": scores.davies_bouldin,
            "silhouette": scores.silhouette, "fpc": scores.fpc, "seconds": seconds}
