"""Factor recovery on the toy world: which known factor each slider moves, read by the toy analyser.

For each slider, the same seeds are drawn at -s and +s; the deterministic analyser reads shape,
colour, size, position and background from both, and `factor_recovery` counts how
often each factor group changes (SliderSpace, Gandikota et al. 2025, Sec. 5: a slider should move
one factor, and together the sliders should cover the factors). Used by `conceptkit evaluate
sliders` on the toy model and by `bench/sliders.py factors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from conceptkit.metrics import normalised_entropy
from conceptkit.toy import FACTORS, analyse_batch
from conceptkit.toy.distribution import FLOOR_SPLITS, distribution_recovery

# Factor groups the table reports; position joins the two position factors.
GROUPS: dict[str, tuple[str, ...]] = {
    "colour": ("colour",), "shape": ("shape",), "size": ("size",), "position": ("horizontal", "vertical"),
    "background": ("background",),
}
CORE = ("colour", "shape", "size", "position")  # the factors "a shape" leaves free; coverage counts these


# ---------------------------------------------------------------- factor recovery


@dataclass(frozen=True)
class FactorRecovery:
    """Which known factor each slider moves (acceptance measure on the toy world)."""

    factors: tuple[str, ...]  # factor groups, e.g. ("shape", "colour", "size", "position", "background")
    change: np.ndarray  # (S, F) share of seeds whose reading of the factor differs between -s and +s
    main: list[str | None]  # the factor each slider moves most (None: it moves nothing)
    purity: np.ndarray  # (S,) change[main] / sum(change)
    valid: np.ndarray  # (S,) share of seeds read validly at both ends


def factor_recovery(minus: list[list[dict | None]], plus: list[list[dict | None]], groups: dict[str, tuple[str, ...]],
                    min_change: float = 0.05) -> FactorRecovery:
    """Per slider, how often each factor group changes between the images at -s and +s.

    Args:
        minus, plus: [slider][seed] the factors read from each image (name -> value), None when unreadable.
        groups: factor group -> the reading's keys it covers, e.g. {"position": ("horizontal", "vertical")}.
        min_change: a slider whose largest change rate is below this moves nothing (main None).
    """
    names = tuple(groups)
    change = np.zeros((len(minus), len(names)))
    valid = np.zeros(len(minus))
    for s, (lo, hi) in enumerate(zip(minus, plus)):
        pairs = [(a, b) for a, b in zip(lo, hi) if a is not None and b is not None]
        valid[s] = len(pairs) / max(1, len(lo))
        for j, name in enumerate(names):
            if pairs:
                change[s, j] = np.mean([any(a.get(k) != b.get(k) for k in groups[name]) for a, b in pairs])
    total = change.sum(1)
    main = [names[int(np.argmax(row))] if row.max() >= min_change else None for row in change]
    purity = np.where(total > 0, change.max(1) / np.maximum(total, 1e-12), 0.0)
    return FactorRecovery(names, change, main, purity, valid)


# ---------------------------------------------------------------- the toy's readings


def read(images_uint8: np.ndarray) -> list[dict[str, Any] | None]:
    """The analyser's factors per image, None where it refuses to read the image.

    Args:
        images_uint8: (N, 32, 32, 3) uint8.
    """
    return [r.factors if r.valid else None for r in analyse_batch(images_uint8)]


def word_factor() -> dict[str, str]:
    """Toy vocabulary word -> its factor group ('left' -> 'position')."""
    return {v: ("position" if f in ("horizontal", "vertical") else f) for f, vs in FACTORS.items() for v in vs}


def label_word(label: str, words: dict[str, str]) -> str:
    """The vocabulary word a label stands for: "red", "red-2" -> "red"; a prompt edit "red/blue" -> its +s word "blue"."""
    label = label.rsplit("/", 1)[-1]
    return label if label in words else label.rsplit("-", 1)[0]


def table(minus: Sequence[np.ndarray], plus: Sequence[np.ndarray], indices: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """The factor-recovery table from images at -s and +s, one (n, 32, 32, 3) uint8 array per slider.

    Returns per slider its main factor, purity (main factor's share of its changes), the share of
    seeds whose reading of each factor changes, and the share read validly at both ends; overall the
    core factors covered, mean purity and how many labels name the main factor.
    """
    rec = factor_recovery([read(m) for m in minus], [read(p) for p in plus], GROUPS)
    covered = sorted({m for m in rec.main if m in CORE})
    words = word_factor()

    def names_main(label: str, main: str | None) -> bool:
        return main is not None and words.get(label_word(label, words)) == main

    rows = [{"index": int(i), "label": lab, "main": rec.main[k], "purity": float(rec.purity[k]), "valid": float(rec.valid[k]),
             "change": {f: float(c) for f, c in zip(rec.factors, rec.change[k])}, "label_names_main": names_main(lab, rec.main[k])}
            for k, (i, lab) in enumerate(zip(indices, labels))]
    return {"factors": list(rec.factors), "coverage": covered, "n_covered": len(covered), "of": list(CORE),
            "mean_purity": float(rec.purity.mean()) if len(rows) else 0.0, "valid": float(rec.valid.mean()) if len(rows) else 0.0,
            "labels_right": int(sum(r["label_names_main"] for r in rows)), "per_slider": rows}


def entropy(images_uint8: np.ndarray) -> dict[str, Any]:
    """How evenly a set of images spreads over each factor's values: the normalised entropy of the analyser's
    readings (0: one value, 1: uniform; `metrics.normalised_entropy`), over the images it can read."""

    ok = [r for r in read(images_uint8) if r is not None]
    return {"valid": len(ok) / max(1, len(images_uint8)),
            "entropy": {f: normalised_entropy([vals.index(r[f]) for r in ok], len(vals)) if ok else None for f, vals in FACTORS.items()}}


STRONG = 0.3  # a main-factor effect (TV above the floor) at least this large counts as a strong shift


def codes(images_uint8: np.ndarray) -> np.ndarray:
    """(N, F) index of each raw factor's value as the analyser reads it (`FACTORS` order), -1 where it refuses.

    Args:
        images_uint8: (N, 32, 32, 3) uint8.
    """
    out = np.full((len(images_uint8), len(FACTORS)), -1, np.int64)
    for i, r in enumerate(read(images_uint8)):
        if r is not None:
            out[i] = [FACTORS[f].index(r[f]) for f in FACTORS]
    return out


def distribution_table(minus: Sequence[np.ndarray], plus: Sequence[np.ndarray], base: np.ndarray, indices: Sequence[int],
                       labels: Sequence[str], *, seed: int = 0) -> dict[str, Any]:
    """The distribution-level factor table (`toy.distribution`) from images at -s and +s and 2n base images.

    Args:
        minus, plus: one (n, 32, 32, 3) uint8 array per slider, the same n seeds at both ends.
        base: (M, 32, 32, 3) uint8 images of the unmodified model on M >= 2n seeds (the noise floor).
        seed: seeds the floor's random splits.
    Returns per slider the TV distance and the effect above the floor of each factor group, the main
    factor, distribution purity (its share of the effects; None when none is above the floor) and
    consistency (share of seeds moving to its +s value); overall the means over the sliders with an
    effect above the floor, coverage of the core factors and labels naming the main factor.
    """

    raw = list(FACTORS)
    groups = {g: tuple(raw.index(k) for k in keys) for g, keys in GROUPS.items()}
    n = len(minus[0]) if len(minus) else 0
    if len(minus) == 0:
        return {"factors": list(GROUPS), "floor": {}, "per_slider": [], "n_above_floor": 0, "mean_distribution_purity": None,
                "mean_main_effect": 0.0, "mean_toward": 0.0, "n_strong": 0, "coverage": [], "n_covered": 0, "of": list(CORE),
                "labels_right": 0, "seeds": 0, "base_seeds": len(base), "floor_splits": FLOOR_SPLITS}
    rec = distribution_recovery(np.stack([codes(m) for m in minus]), np.stack([codes(p) for p in plus]), codes(base), groups,
                                [len(FACTORS[k]) for k in raw], seed=seed, keys=raw)
    words = word_factor()
    rows = []
    for k, (i, lab) in enumerate(zip(indices, labels)):
        m, pv = rec.main[k], rec.plus_value[k]
        base_word = label_word(lab, words)
        rows.append({
            "index": int(i), "label": lab, "main": m,
            "tv": {g: (None if np.isnan(v) else float(v)) for g, v in zip(rec.groups, rec.tv[k])},
            "effect": {g: float(v) for g, v in zip(rec.groups, rec.effect[k])},
            "main_effect": float(rec.effect[k].max()),
            "distribution_purity": None if np.isnan(rec.purity[k]) else float(rec.purity[k]),
            "toward": float(rec.toward[k]), "against": float(rec.against[k]),
            "plus_value": None if pv is None else f"{pv[0]}={FACTORS[pv[0]][pv[1]]}",
            "label_names_main": m is not None and words.get(base_word) == m,
        })
    above = [r for r in rows if r["main"] is not None]
    covered = sorted({r["main"] for r in above if r["main"] in CORE})
    return {
        "factors": list(rec.groups), "floor": {g: float(v) for g, v in zip(rec.groups, rec.floor)}, "per_slider": rows,
        "n_above_floor": len(above),
        "mean_distribution_purity": float(np.mean([r["distribution_purity"] for r in above])) if above else None,
        "mean_main_effect": float(np.mean([r["main_effect"] for r in rows])),
        "mean_toward": float(np.mean([r["toward"] for r in rows])),
        "n_strong": sum(r["main_effect"] >= STRONG for r in rows), "strong": STRONG,
        "coverage": covered, "n_covered": len(covered), "of": list(CORE),
        "labels_right": sum(r["label_names_main"] for r in rows),
        "seeds": n, "base_seeds": len(base), "floor_splits": FLOOR_SPLITS,
    }
