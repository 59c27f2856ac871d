"""`--report DIR` of `conceptkit evaluate`: PNG plots (matplotlib, Agg) and one self-contained HTML page.

Rendering only: it reads an evaluation's JSON document and its saved arrays and computes nothing
new. The HTML embeds every PNG as a base64 data URI, so the one file opens anywhere.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from conceptkit import store


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    plt = _plt()
    with store.atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def image_grid(path: Path, images: np.ndarray, title: str, cols: int = 8, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None) -> str:
    """(N, H, W, 3) uint8 images as a grid, `cols` per row."""
    plt = _plt()
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
    return _save(fig, path)


def heatmap(path: Path, matrix: np.ndarray, title: str, labels: list[str] | None = None, vmin: float = -1.0, vmax: float = 1.0,
            annotate: bool = True) -> str:
    """A square matrix with a diverging colour map on [vmin, vmax]."""
    plt = _plt()
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
    return _save(fig, path)


def bars(path: Path, names: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 3))
    width = 0.8 / max(1, len(series))
    for j, (lab, vals) in enumerate(series.items()):
        ax.bar(np.arange(len(names)) + j * width, vals, width, label=lab)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def curves(path: Path, x: list[float], series: dict[str, list[float | None]], xlabel: str, title: str) -> str:
    """One small panel per series (the metrics have different scales)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(2.6 * len(series), 2.4), squeeze=False)
    for ax, (name, ys) in zip(axes[0], series.items()):
        pts = [(a, b) for a, b in zip(x, ys) if b is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9, y=1.06)
    return _save(fig, path)


# ---------------------------------------------------------------- HTML


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: str, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 1.5em;max-width:1100px;color:#222;background:#fff}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}
th{background:#f0f0f0}figure{display:inline-block;margin:.5em}img{max-width:100%;image-rendering:pixelated}
figcaption{font-size:12px;color:#555}.note{color:#555;font-size:13px}"""


def page(title: str, sections: list[str], note: str = "") -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p class=\"note\">{html.escape(note)}</p>{''.join(sections)}</body></html>\n")


def write(doc: dict[str, Any], arrays: dict[str, np.ndarray], folder: Path) -> dict[str, str]:
    """Write the plots and `report.html` for an evaluation document into `folder`; returns {name: path}."""
    from conceptkit import report_sections

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        from conceptkit.errors import UsageError

        raise UsageError(f"--report {folder} is a file, not a folder")
    render = {"sliders": report_sections.sliders, "images": report_sections.images, "cluster": report_sections.cluster}[doc["what"]]
    title, sections, files = render(doc, arrays, folder)
    note = (f"conceptkit evaluate {doc['what']} · key {doc['key']} · encoder {doc.get('encoder', '')} · "
            f"every number is recomputable from the arrays in {doc['path']}")
    path = folder / "report.html"
    with store.atomic_path(path) as tmp:
        tmp.write_text(page(title, sections, note), encoding="utf-8")
    return {**files, "html": str(path)}
