"""Read the factors back from an image: deterministic pixel geometry, no learning.

The reader refuses rather than guesses: an image whose border is not one plain colour, whose
foreground is not one clean blob of one colour, or whose blob matches no shape template is
reported `valid=False` with a reason and `None` factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from conceptkit.toy.world import (
    AREA_FRACTION, BACKGROUNDS_RGB, COLOURS_RGB, FACTORS, IMAGE_SIZE, POSITION_CUTS, SIZE_CUTS, coverage,
)


@dataclass(frozen=True)
class AnalyserConfig:
    """Tolerances of the reader (RGB distances in 0-255 units)."""

    border_tol: float = 48.0  # a border pixel this close to the border median counts as background
    border_min_fraction: float = 0.9  # fraction of border pixels that must be background
    background_tol: float = 70.0  # the background median must lie this close to a named background
    colour_tol: float = 90.0  # the foreground median must lie this close to a named colour
    min_area: float = 25.0  # smallest blob area in pixels (a small circle covers ~50)
    stray_fraction: float = 0.12  # coverage outside the main blob, relative to its area, tolerated
    residual_tol: float = 60.0  # a pixel this far from background+alpha*(fg-bg) is unexplained
    max_unexplained: float = 0.04  # fraction of unexplained pixels tolerated
    min_iou: float = 0.72  # soft IoU with the best shape template

    def __post_init__(self) -> None:
        for name in ("border_tol", "background_tol", "colour_tol", "min_area", "residual_tol"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("border_min_fraction", "stray_fraction", "max_unexplained", "min_iou"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class Reading:
    """What the analyser read from one image; factors are None when `valid` is False."""

    valid: bool
    reason: str  # "ok" or why the image was rejected
    factors: dict[str, str | None] = field(default_factory=dict)  # keyed as FACTORS
    side: float | None = None  # estimated bounding-box side in pixels
    cx: float | None = None
    cy: float | None = None
    iou: float | None = None  # soft IoU with the chosen shape template


_BG_NAMES = list(BACKGROUNDS_RGB)
_BG = np.array([BACKGROUNDS_RGB[k] for k in _BG_NAMES], np.float32)
_COL_NAMES = list(COLOURS_RGB)
_COL = np.array([COLOURS_RGB[k] for k in _COL_NAMES], np.float32)


def _bin(value: float, cuts: tuple[float, float], names: tuple[str, ...]) -> str:
    return names[int(np.searchsorted(np.asarray(cuts), value))]


def _invalid(reason: str, background: str | None = None) -> Reading:
    factors: dict[str, str | None] = {k: None for k in FACTORS}
    factors["background"] = background
    return Reading(valid=False, reason=reason, factors=factors)


def analyse(image: np.ndarray, config: AnalyserConfig = AnalyserConfig()) -> Reading:
    """Read shape, colour, size, position and background from one image.

    Args:
        image: (32, 32, 3) RGB, uint8 in 0-255 or float in [0, 1].
        config: the reader's tolerances.
    """
    img = np.asarray(image)
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected a ({IMAGE_SIZE}, {IMAGE_SIZE}, 3) image, got {img.shape}")
    img = img.astype(np.float32) * (255.0 if img.dtype.kind == "f" else 1.0)
    # 1. background: the median of the border, which must be one plain named colour
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    if np.mean(np.linalg.norm(border - bg, axis=1) <= config.border_tol) < config.border_min_fraction:
        return _invalid("border is not one plain colour")
    d_bg = np.linalg.norm(_BG - bg, axis=1)
    if d_bg.min() > config.background_tol:
        return _invalid("background matches no named background")
    background = _BG_NAMES[int(d_bg.argmin())]
    # 2. foreground colour: the median of the pixels far from the background
    dist = np.linalg.norm(img - bg, axis=2)
    far = dist > 0.5 * max(dist.max(), 1e-6)
    if dist.max() < config.border_tol or far.sum() < config.min_area / 2:
        return _invalid("no foreground", background)
    fg = np.median(img[far], axis=0)
    d_col = np.linalg.norm(_COL - fg, axis=1)
    if d_col.min() > config.colour_tol:
        return _invalid("foreground matches no named colour", background)
    colour = _COL_NAMES[int(d_col.argmin())]
    # 3. soft coverage (alpha) along the background->foreground line, and what it leaves unexplained
    axis = fg - bg
    alpha = np.clip(((img - bg) @ axis) / float(axis @ axis), 0.0, 1.0)
    residual = np.linalg.norm(img - (bg + alpha[..., None] * axis), axis=2)
    if np.mean(residual > config.residual_tol) > config.max_unexplained:
        return _invalid("pixels not explained by one colour on the background", background)
    # 4. one blob: the largest connected component of alpha > 0.5 holds nearly all coverage
    labels, count = ndimage.label(alpha > 0.5)
    if count == 0:
        return _invalid("no foreground", background)
    sizes = ndimage.sum(np.ones_like(alpha), labels, index=np.arange(1, count + 1))
    main = labels == (int(np.argmax(sizes)) + 1)
    blob = ndimage.binary_dilation(main, iterations=2)
    area = float(alpha[blob].sum())
    if area < config.min_area:
        return _invalid("foreground too small", background)
    stray = np.where(~blob & (alpha > 0.25), alpha, 0.0)  # ignore the faint floor that pixel noise leaves
    if float(stray.sum()) > config.stray_fraction * area:
        return _invalid("more than one blob", background)
    a = np.where(blob, alpha, 0.0)
    # 5. shape: the template (at the size and centre implied by area and centroid) that fits best
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    mx, my = float((a * xs).sum() / area), float((a * ys).sum() / area)
    best = None
    for shape in FACTORS["shape"]:
        side = float(np.sqrt(area / AREA_FRACTION[shape]))
        cy = my - side / 6 if shape == "triangle" else my  # a triangle's centroid sits 1/6 below its box centre
        t = coverage(shape, np.array([side]), np.array([mx]), np.array([cy]), supersample=3)[0]
        iou = float(np.minimum(a, t).sum() / max(np.maximum(a, t).sum(), 1e-6))
        if best is None or iou > best[0]:
            best = (iou, shape, side, mx, cy)
    iou, shape, side, cx, cy = best
    if iou < config.min_iou:
        return _invalid(f"blob matches no shape (best IoU {iou:.2f})", background)
    factors = {
        "shape": shape, "colour": colour, "size": _bin(side, SIZE_CUTS, FACTORS["size"]),
        "horizontal": _bin(cx, POSITION_CUTS, FACTORS["horizontal"]),
        "vertical": _bin(cy, POSITION_CUTS, FACTORS["vertical"]), "background": background,
    }
    return Reading(valid=True, reason="ok", factors=factors, side=side, cx=cx, cy=cy, iou=iou)


def analyse_batch(images: np.ndarray, config: AnalyserConfig = AnalyserConfig()) -> list[Reading]:
    """`analyse` over a batch.

    Args:
        images: (N, 32, 32, 3) RGB, uint8 or float in [0, 1].
    """
    return [analyse(im, config) for im in images]
