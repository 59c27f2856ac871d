"""Factor recovery on the toy world: which known factor each slider moves, read by the toy analyser.

For each slider, the same seeds are drawn at -s and +s; the deterministic analyser reads shape,
colour, size, position and background from both, and `slider_labels.factor_recovery` counts how
often each factor group changes (SliderSpace, Gandikota et al. 2025, Sec. 5: a slider should move
one factor, and together the sliders should cover the factors). Used by `conceptkit evaluate
sliders` on the toy model and by `bench/sliders.py factors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Factor groups the table reports; position joins the two position factors.
GROUPS: dict[str, tuple[str, ...]] = {
    "colour": ("colour",), "shape": ("shape",), "size": ("size",), "position": ("horizontal", "vertical"),
    "background": ("background",),
}
CORE = ("colour", "shape", "size", "position")  # the factors "a shape" leaves free; coverage counts these


def read(images_uint8: np.ndarray) -> list[dict[str, Any] | None]:
    """The analyser's factors per image, None where it refuses to read the image.

    Args:
        images_uint8: (N, 32, 32, 3) uint8.
    """
    from conceptkit.toy import analyse_batch

    return [r.factors if r.valid else None for r in analyse_batch(images_uint8)]


def word_factor() -> dict[str, str]:
    """Toy vocabulary word -> its factor group ('left' -> 'position')."""
    from conceptkit.toy import FACTORS

    return {v: ("position" if f in ("horizontal", "vertical") else f) for f, vs in FACTORS.items() for v in vs}


def table(minus: Sequence[np.ndarray], plus: Sequence[np.ndarray], indices: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """The factor-recovery table from images at -s and +s, one (n, 32, 32, 3) uint8 array per slider.

    Returns per slider its main factor, purity (main factor's share of its changes), the share of
    seeds whose reading of each factor changes, and the share read validly at both ends; overall the
    core factors covered, mean purity and how many labels name the main factor.
    """
    from conceptkit.slider_labels import factor_recovery

    rec = factor_recovery([read(m) for m in minus], [read(p) for p in plus], GROUPS)
    covered = sorted({m for m in rec.main if m in CORE})
    words = word_factor()

    def names_main(label: str, main: str | None) -> bool:
        base = label if label in words else label.rsplit("-", 1)[0]
        return main is not None and words.get(base) == main

    rows = [{"index": int(i), "label": lab, "main": rec.main[k], "purity": float(rec.purity[k]), "valid": float(rec.valid[k]),
             "change": {f: float(c) for f, c in zip(rec.factors, rec.change[k])}, "label_names_main": names_main(lab, rec.main[k])}
            for k, (i, lab) in enumerate(zip(indices, labels))]
    return {"factors": list(rec.factors), "coverage": covered, "n_covered": len(covered), "of": list(CORE),
            "mean_purity": float(rec.purity.mean()) if len(rows) else 0.0, "valid": float(rec.valid.mean()) if len(rows) else 0.0,
            "labels_right": int(sum(r["label_names_main"] for r in rows)), "per_slider": rows}


def entropy(images_uint8: np.ndarray) -> dict[str, Any]:
    """How evenly a set of images spreads over each factor's values: the normalised entropy of the analyser's
    readings (0: one value, 1: uniform; `metrics.normalised_entropy`), over the images it can read."""
    from conceptkit.metrics import normalised_entropy
    from conceptkit.toy import FACTORS

    ok = [r for r in read(images_uint8) if r is not None]
    return {"valid": len(ok) / max(1, len(images_uint8)),
            "entropy": {f: normalised_entropy([vals.index(r[f]) for r in ok], len(vals)) if ok else None for f, vals in FACTORS.items()}}
