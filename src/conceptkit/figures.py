"""Image primitives the commands share: a grid of images, with column labels."""

from __future__ import annotations

import numpy as np
import torch


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
