"""Image primitives the commands share: a grid of images with column labels (PNG cells), and the
matplotlib figures of reports and Picasso (Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conceptkit import store


def grid_image(images: torch.Tensor, rows: int, cols: int, pad: int = 2) -> torch.Tensor:
    """(N, C, H, W) images, row-major, into one (C, H', W') grid on white with `pad` pixels between."""
    _, c, h, w = images.shape
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for n, img in enumerate(images):
        r, q = divmod(n, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def with_column_labels(grid: torch.Tensor, labels: list[str], cell_w: int, pad: int = 2) -> torch.Tensor:
    """The grid with a white header strip that names each column (e.g. its slider strength)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    height = 14
    header = Image.new("RGB", (grid.shape[2], height), "white")
    draw = ImageDraw.Draw(header)
    for q, text in enumerate(labels):
        width = draw.textlength(text, font=font)
        x = pad + q * (cell_w + pad) + max(0.0, (cell_w - width) / 2)
        draw.text((x, 1), text, fill="black", font=font)
    strip = torch.from_numpy(np.asarray(header, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return torch.cat([strip, grid], 1)


# ---------------------------------------------------------------- matplotlib figures


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> str:
    """Write a matplotlib figure as a PNG, atomically; returns the path."""
    plt = pyplot()
    with store.atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def image_grid(path: Path, images: np.ndarray, title: str, cols: int = 8, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None) -> str:
    """(N, H, W, 3) uint8 images as a grid, `cols` per row."""
    plt = pyplot()
    n = len(images)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols + (0.8 if row_labels else 0), 1.1 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
        else:
            ax.axis("off")
    for r, lab in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(lab, fontsize=7, rotation=0, ha="right", va="center")
    for c, lab in enumerate(col_labels or []):
        axes[0, c].set_title(lab, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def heatmap(path: Path, matrix: np.ndarray, title: str, labels: list[str] | None = None, vmin: float = -1.0, vmax: float = 1.0,
            annotate: bool = True) -> str:
    """A square matrix with a diverging colour map on [vmin, vmax]."""
    plt = pyplot()
    m = np.asarray(matrix, dtype=float)
    side = max(3.0, 0.45 * len(m) + 1.5)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    im = ax.imshow(m, cmap="RdBu_r", vmin=vmin, vmax=vmax)
    if labels:
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7, ha="right")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    if annotate and len(m) <= 16:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if abs(v) > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def bars(path: Path, names: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 3))
    width = 0.8 / max(1, len(series))
    for j, (lab, vals) in enumerate(series.items()):
        ax.bar(np.arange(len(names)) + j * width, vals, width, label=lab)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def curves(path: Path, x: list[float], series: dict[str, list[float | None]], xlabel: str, title: str) -> str:
    """One small panel per series (the metrics have different scales)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(2.6 * len(series), 2.4), squeeze=False)
    for ax, (name, ys) in zip(axes[0], series.items()):
        pts = [(a, b) for a, b in zip(x, ys) if b is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9, y=1.06)
    return save_figure(fig, path)
