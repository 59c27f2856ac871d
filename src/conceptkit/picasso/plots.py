"""PNG figures for Picasso: cluster-centre maps, the segmentation, timestep-similarity heatmaps
(diverging colour map, centred on 0) and sweep curves. matplotlib with the Agg backend, written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conceptkit.figures import pyplot, save_figure


def _figure(ncols: int, nrows: int = 1, size: float = 2.4):
    plt = pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.4), squeeze=False)
    return plt, fig, axes


def centre_maps_figure(path: Path, maps: np.ndarray, title: str = "") -> str:
    """One panel per cluster centre map (k, S, S)."""
    plt, fig, axes = _figure(len(maps))
    for c, (ax, m) in enumerate(zip(axes[0], maps, strict=True)):
        im = ax.imshow(m, cmap="magma")
        ax.set_title(f"sub-concept {c}", fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, format="%.3g")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def segmentation_figure(path: Path, seg: np.ndarray, k: int, title: str = "", references: np.ndarray | None = None) -> str:
    """The per-pixel argmax of the centre maps, one colour per sub-concept; with `references`
    ((n, 3, H, W) in [0, 1]), up to 4 of them follow, the segmentation laid over each at 40%."""
    refs = [] if references is None else list(references[:4])
    plt, fig, axes = _figure(1 + len(refs), size=3.0)
    ax = axes[0][0]
    im = ax.imshow(seg, cmap="tab10", vmin=-0.5, vmax=9.5, interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, ticks=range(k), fraction=0.046)
    cb.ax.set_ylim(-0.5, k - 0.5)
    ax.set_title(title or "segmentation", fontsize=9)
    ax.axis("off")
    for i, (ax, img) in enumerate(zip(axes[0][1:], refs, strict=True)):
        h, w = img.shape[1:]
        ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1), extent=(0, w, h, 0))
        ax.imshow(seg, cmap="tab10", vmin=-0.5, vmax=9.5, alpha=0.4, interpolation="nearest", extent=(0, w, h, 0))
        ax.set_title(f"reference {i}", fontsize=9)
        ax.axis("off")
    return save_figure(fig, path)


def similarity_figure(path: Path, jaccard: np.ndarray, correlation: np.ndarray, cluster_jaccard: np.ndarray,
               timesteps: Sequence[int]) -> str:
    """Row 1: Jaccard of all kept sets, then each sub-concept's Jaccard; row 2: each sub-concept's weight correlation."""
    k = len(correlation)
    plt, fig, axes = _figure(k + 1, 2)
    ticks = np.linspace(0, len(timesteps) - 1, min(5, len(timesteps))).round().astype(int)
    panels = [(axes[0][0], jaccard, "Jaccard, all kept")]
    panels += [(axes[0][c + 1], cluster_jaccard[c], f"Jaccard, sub-concept {c}") for c in range(k)]
    panels += [(axes[1][c + 1], correlation[c], f"correlation, sub-concept {c}") for c in range(k)]
    im = None
    for ax, m, title in panels:
        im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.set_xticks(ticks, [str(timesteps[i]) for i in ticks], fontsize=6)
        ax.set_yticks(ticks, [str(timesteps[i]) for i in ticks], fontsize=6)
    axes[1][0].axis("off")
    fig.colorbar(im, ax=axes[1][0], fraction=0.5, label="similarity (t vs t)")
    return save_figure(fig, path)


def sweep_figure(path: Path, param: str, points) -> str:
    """Metrics and FCM time against the swept parameter."""
    names = ("calinski_harabasz", "davies_bouldin", "silhouette", "fpc")
    plt, fig, axes = _figure(5, size=2.6)
    ok = [p for p in points if p.scores is not None]
    xs = [p.value for p in ok]
    for ax, name in zip(axes[0], names, strict=False):
        ax.plot(xs, [getattr(p.scores, name) if getattr(p.scores, name) is not None else np.nan for p in ok], "o-")
        ax.set_title(name.replace("_", "-"), fontsize=9)
        ax.set_xlabel(param)
    axes[0][4].plot(xs, [p.seconds for p in ok], "o-")
    axes[0][4].set_title("FCM seconds", fontsize=9)
    axes[0][4].set_xlabel(param)
    return save_figure(fig, path)
