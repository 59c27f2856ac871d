"""The toy world: one shape on a plain background at 32x32, with factors we know.

Every factor is sampled independently. Continuous factors (size, position) are drawn uniformly
inside the range of their named bin, and the bins leave gaps between them, so a bin is always
readable from the pixels; the largest shape fits at every position with a 2-pixel margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32

# The factor vocabulary: factor name -> its named values, in a fixed order.
FACTORS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "diamond"),
    "colour": ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"),
    "size": ("small", "medium", "large"),
    "horizontal": ("left", "centre", "right"),
    "vertical": ("top", "middle", "bottom"),
    "background": ("black", "white", "gray"),
}

COLOURS_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 130, 0), "yellow": (240, 220, 20), "green": (30, 170, 50),
    "cyan": (20, 200, 210), "blue": (30, 70, 230), "purple": (130, 50, 200), "pink": (245, 120, 190),
}
BACKGROUNDS_RGB: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}

# Bounding-box side in pixels for each size bin, and the centre coordinate for each position bin.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (8.0, 10.0), "medium": (12.0, 14.0), "large": (16.0, 18.0)}
POSITION_RANGES: dict[str, tuple[float, float]] = {
    "left": (11.0, 13.0), "centre": (15.0, 17.0), "right": (19.0, 21.0),
    "top": (11.0, 13.0), "middle": (15.0, 17.0), "bottom": (19.0, 21.0),
}
# Cut points between bins (midpoints of the gaps), used by the analyser.
SIZE_CUTS = (11.0, 15.0)
POSITION_CUTS = (14.0, 18.0)
# Area of each shape as a fraction of its bounding box (size * size).
AREA_FRACTION = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
# Fixed extra words of the caption grammar.
GRAMMAR_WORDS = ("a", "an", "shape", "at", "the", "on", "background")


@dataclass(frozen=True)
class Scene:
    """One scene: a named value per factor plus the continuous size and centre in pixels."""

    shape: str
    colour: str
    size: str
    horizontal: str
    vertical: str
    background: str
    side: float  # bounding-box side in pixels
    cx: float  # centre x in pixels (0 = left edge of the image)
    cy: float  # centre y in pixels (0 = top edge)

    @property
    def factors(self) -> dict[str, str]:
        """The named value of each factor, keyed as in `FACTORS`."""
        return {name: getattr(self, name) for name in FACTORS}


def vocabulary() -> list[str]:
    """Every word of the caption grammar (each is one token of the toy tokenizer)."""
    words = [w for values in FACTORS.values() for w in values] + list(GRAMMAR_WORDS)
    return list(dict.fromkeys(words))


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """Draw `n` scenes with every factor independent and uniform over its values.

    Args:
        n: number of scenes.
        seed: seed of the numpy generator; the same seed gives the same scenes.
    """
    rng = np.random.default_rng(seed)
    picks = {name: rng.integers(0, len(values), size=n) for name, values in FACTORS.items()}
    u = rng.random((n, 3))
    scenes = []
    for i in range(n):
        f = {name: FACTORS[name][picks[name][i]] for name in FACTORS}
        lo, hi = SIZE_RANGES[f["size"]]
        xlo, xhi = POSITION_RANGES[f["horizontal"]]
        ylo, yhi = POSITION_RANGES[f["vertical"]]
        scenes.append(Scene(**f, side=lo + (hi - lo) * u[i, 0], cx=xlo + (xhi - xlo) * u[i, 1], cy=ylo + (yhi - ylo) * u[i, 2]))
    return scenes


def coverage(shape: str, side: np.ndarray, cx: np.ndarray, cy: np.ndarray, supersample: int = 4) -> np.ndarray:
    """Antialiased coverage of shapes of one kind, by supersampling each pixel.

    Args:
        shape: one of `FACTORS["shape"]`.
        side, cx, cy: (N,) bounding-box sides and centres in pixels.
        supersample: sub-samples per pixel along each axis.
    Returns:
        (N, 32, 32) float32 coverage in [0, 1].
    """
    s = supersample
    grid = (np.arange(IMAGE_SIZE * s, dtype=np.float32) + 0.5) / s
    x = grid[None, None, :] - np.asarray(cx, np.float32)[:, None, None]
    y = grid[None, :, None] - np.asarray(cy, np.float32)[:, None, None]
    h = np.asarray(side, np.float32)[:, None, None] / 2
    if shape == "circle":
        inside = x * x + y * y <= h * h
    elif shape == "square":
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":  # apex up: half-width grows from 0 at the top to h at the bottom
        inside = (y <= h) & (np.abs(x) <= (y + h) / 2)
    elif shape == "diamond":
        inside = np.abs(x) + np.abs(y) <= h
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {FACTORS['shape']}")
    n = inside.shape[0]
    return inside.reshape(n, IMAGE_SIZE, s, IMAGE_SIZE, s).mean(axis=(2, 4), dtype=np.float32)


def render(scenes: list[Scene], foreground: tuple[int, int, int] | None = None) -> np.ndarray:
    """Render scenes to images.

    Args:
        scenes: N scenes.
        foreground: an RGB colour for every shape instead of the scenes' named colours (a colour
            the toy never saw, for `implant`).
    Returns:
        (N, 32, 32, 3) uint8 RGB images.
    """
    n = len(scenes)
    alpha = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for shape in FACTORS["shape"]:
        idx = [i for i, sc in enumerate(scenes) if sc.shape == shape]
        if idx:
            alpha[idx] = coverage(shape, *(np.array([getattr(scenes[i], k) for i in idx]) for k in ("side", "cx", "cy")))
    fg = np.array([foreground or COLOURS_RGB[sc.colour] for sc in scenes], np.float32)[:, None, None, :]
    bg = np.array([BACKGROUNDS_RGB[sc.background] for sc in scenes], np.float32)[:, None, None, :]
    img = bg + alpha[..., None] * (fg - bg)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def caption(scene: Scene, mentioned: set[str] | frozenset[str] | None = None) -> str:
    """The caption of a scene that names only the factors in `mentioned` (all when None).

    "a shape", "a red shape", "a large blue triangle at the top left on a black background".
    """
    m = set(FACTORS) if mentioned is None else set(mentioned)
    unknown = m - set(FACTORS)
    if unknown:
        raise ValueError(f"unknown factors {sorted(unknown)}; expected some of {list(FACTORS)}")
    words = [scene.size] if "size" in m else []
    words += [scene.colour] if "colour" in m else []
    words += [scene.shape if "shape" in m else "shape"]
    article = "an" if words[0][0] in "aeiou" else "a"
    text = " ".join([article] + words)
    where = [getattr(scene, k) for k in ("vertical", "horizontal") if k in m]
    if where:
        text += " at the " + " ".join(where)
    if "background" in m:
        text += f" on a {scene.background} background"
    return text


def prompt(**factors: str) -> str:
    """The caption naming exactly the given factor values, e.g. `prompt(colour="red")` -> "a red shape"."""
    for name, value in factors.items():
        if name not in FACTORS or value not in FACTORS[name]:
            raise ValueError(f"bad factor {name}={value!r}; vocabulary: {FACTORS}")
    base = dict(shape="circle", colour="red", size="small", horizontal="left", vertical="top", background="black")
    return caption(Scene(**{**base, **factors}, side=0.0, cx=0.0, cy=0.0), set(factors))


def random_captions(scenes: list[Scene], seed: int, p_mention: float = 0.7) -> list[str]:
    """Captions that mention each factor independently with probability `p_mention`.

    Args:
        scenes: N scenes.
        seed: seed of the draw of which factors are mentioned.
        p_mention: probability that a caption names a given factor.
    """
    if not 0.0 <= p_mention <= 1.0:
        raise ValueError(f"p_mention must be in [0, 1], got {p_mention}")
    rng = np.random.default_rng(seed)
    keep = rng.random((len(scenes), len(FACTORS))) < p_mention
    names = list(FACTORS)
    return [caption(sc, {names[j] for j in range(len(names)) if keep[i, j]}) for i, sc in enumerate(scenes)]


def factor_indices(scenes: list[Scene]) -> np.ndarray:
    """(N, F) int64 index of each scene's value within each factor, in `FACTORS` order."""
    return np.array([[FACTORS[k].index(getattr(sc, k)) for k in FACTORS] for sc in scenes], np.int64)
