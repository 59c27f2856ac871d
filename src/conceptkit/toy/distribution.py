"""Distribution-level factor effects: what a slider does to the spread of a factor, net of seed noise.

The per-seed table (`toy.factors.table`) counts how often a factor's reading changes between -s
and +s on the same seed; on a model that re-draws unnamed factors whenever its conditioning
changes, that mixes the slider's effect with the model's re-rolling. These functions separate
the two: a factor's effect is the total-variation distance between its value distribution at -s
and at +s over the seeds, minus the noise floor, the same distance between two disjoint halves
of the unmodified model's seeds. A slider that re-rolls a factor without shifting its
distribution scores about the floor, so about 0. All inputs are integer value codes, -1 where
the analyser refused the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FLOOR_SPLITS = 20  # random N/N splits of the 2N base seeds averaged into the noise floor


def distribution(values: np.ndarray, n_values: int) -> np.ndarray | None:
    """(V,) share of each value among the valid entries of (n,) codes (-1 = unreadable); None if none is valid."""
    v = np.asarray(values).ravel()
    v = v[v >= 0]
    if v.size == 0:
        return None
    if v.max() >= n_values:
        raise ValueError(f"value code {int(v.max())} out of range for {n_values} values")
    return np.bincount(v, minlength=n_values) / v.size


def tv_distance(a: np.ndarray, b: np.ndarray, n_values: int) -> float:
    """Total-variation distance 0.5 * sum_v |p_a(v) - p_b(v)| between two sets of codes (NaN if either is empty)."""
    p, q = distribution(a, n_values), distribution(b, n_values)
    if p is None or q is None:
        return float("nan")
    return float(0.5 * np.abs(p - q).sum())


def noise_floor(base: np.ndarray, n_values: int, n: int, *, splits: int = FLOOR_SPLITS, seed: int = 0) -> float:
    """Mean TV distance between two disjoint n-seed halves of the base codes, over `splits` random splits.

    Args:
        base: (M,) codes of the unmodified model, M >= 2n (the first 2n of a random permutation form each split).
        n: seeds per half, the number of seeds the slider is read on.
    """
    base = np.asarray(base).ravel()
    if n < 1 or base.size < 2 * n:
        raise ValueError(f"a noise floor for {n} seeds needs at least {2 * n} base codes (got {base.size})")
    rng = np.random.default_rng(seed)
    d = []
    for _ in range(splits):
        perm = rng.permutation(base.size)
        d.append(tv_distance(base[perm[:n]], base[perm[n:2 * n]], n_values))
    d = np.asarray(d)
    return float(d[~np.isnan(d)].mean()) if (~np.isnan(d)).any() else float("nan")


def joint_codes(codes: np.ndarray, sizes: Sequence[int]) -> tuple[np.ndarray, int]:
    """(..., k) per-factor codes -> (...,) one code for the joint value (mixed radix), -1 where any is -1; and its count."""
    c = np.asarray(codes)
    joint = np.zeros(c.shape[:-1], np.int64)
    for j, size in enumerate(sizes):
        joint = joint * size + c[..., j]
    joint[(c < 0).any(-1)] = -1
    return joint, int(np.prod(sizes))


def consistency(minus: np.ndarray, plus: np.ndarray, n_values: int) -> tuple[float, float, int | None]:
    """(toward, against, v+): how the seeds read validly at both ends move relative to the slider's +s value.

    v+ is the value whose share grows most from -s to +s (argmax of p_plus - p_minus over the paired
    seeds); toward is the share of those seeds at v+ at +s but not at -s, against the share at v+ at
    -s but not at +s. (0, 0, None) without a valid pair.
    """
    lo, hi = np.asarray(minus).ravel(), np.asarray(plus).ravel()
    ok = (lo >= 0) & (hi >= 0)
    if not ok.any():
        return 0.0, 0.0, None
    lo, hi = lo[ok], hi[ok]
    gain = np.bincount(hi, minlength=n_values) - np.bincount(lo, minlength=n_values)
    v = int(np.argmax(gain))
    return float(np.mean((hi == v) & (lo != v))), float(np.mean((lo == v) & (hi != v))), v


@dataclass(frozen=True)
class DistributionRecovery:
    """Per slider and factor group: TV distances, effects above the noise floor, main factor, purity, consistency."""

    groups: tuple[str, ...]  # factor groups, e.g. ("colour", "shape", "size", "position", "background")
    floor: np.ndarray  # (G,) noise floor of each group's TV distance at n seeds
    tv: np.ndarray  # (S, G) TV distance between the group's value distribution at -s and at +s
    effect: np.ndarray  # (S, G) max(0, tv - floor)
    main: list[str | None]  # group with the largest effect; None when no effect is above the floor
    purity: np.ndarray  # (S,) effect[main] / sum(effect); NaN when nothing is above the floor
    toward: np.ndarray  # (S,) share of seeds whose main factor moves to the slider's +s value (0 without main)
    against: np.ndarray  # (S,) share moving away from it
    plus_value: list[tuple[str, int] | None]  # (key, value code) the +s value of the main factor's chosen key


def distribution_recovery(minus: np.ndarray, plus: np.ndarray, base: np.ndarray, groups: dict[str, Sequence[int]],
                          sizes: Sequence[int], *, splits: int = FLOOR_SPLITS, seed: int = 0,
                          keys: Sequence[str] | None = None) -> DistributionRecovery:
    """The distribution-level factor table from value codes.

    Args:
        minus, plus: (S, n, F) codes of each raw factor at -s and +s, seed by seed (-1 unreadable).
        base: (M, F) codes of the unmodified model on M >= 2n other seeds (the noise floor).
        groups: group name -> column indices it joins, e.g. {"position": (3, 4)}; a joined group's value is
            the joint value of its columns.
        sizes: (F,) number of values of each raw factor.
        keys: (F,) names of the raw factors (for `plus_value`); default their column numbers.
    A multi-column group's consistency is measured on its column with the largest TV distance.
    """
    minus, plus, base = np.asarray(minus), np.asarray(plus), np.asarray(base)
    if minus.shape != plus.shape or minus.ndim != 3 or base.ndim != 2 or base.shape[1] != minus.shape[2]:
        raise ValueError(f"codes must be (S, n, F) twice and (M, F); got {minus.shape}, {plus.shape}, {base.shape}")
    keys = [str(j) for j in range(len(sizes))] if keys is None else list(keys)
    names = tuple(groups)
    s_count, n = minus.shape[:2]
    floor = np.zeros(len(names))
    tv = np.zeros((s_count, len(names)))
    for g, name in enumerate(names):
        cols = list(groups[name])
        sz = [sizes[c] for c in cols]
        b, nv = joint_codes(base[:, cols], sz)
        floor[g] = noise_floor(b, nv, n, splits=splits, seed=seed)
        lo, _ = joint_codes(minus[:, :, cols], sz)
        hi, _ = joint_codes(plus[:, :, cols], sz)
        tv[:, g] = [tv_distance(lo[s], hi[s], nv) for s in range(s_count)]
    effect = np.maximum(np.nan_to_num(tv - floor[None], nan=0.0), 0.0)
    total = effect.sum(1)
    main = [names[int(np.argmax(row))] if row.max() > 0 else None for row in effect]
    purity = np.where(total > 0, effect.max(1) / np.maximum(total, 1e-12), np.nan)
    toward, against, plus_value = np.zeros(s_count), np.zeros(s_count), []
    for s, m in enumerate(main):
        if m is None:
            plus_value.append(None)
            continue
        cols = list(groups[m])
        col = max(cols, key=lambda c: np.nan_to_num(tv_distance(minus[s, :, c], plus[s, :, c], sizes[c]), nan=-1.0))
        toward[s], against[s], v = consistency(minus[s, :, col], plus[s, :, col], sizes[col])
        plus_value.append(None if v is None else (keys[col], v))
    return DistributionRecovery(names, floor, tv, effect, main, purity, toward, against, plus_value)
