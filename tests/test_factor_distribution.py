"""Distribution-level factor effects (`conceptkit.toy.distribution`, `toy.factors.distribution_table`) on hand-computed cases."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from conceptkit.toy.distribution import consistency, distribution_recovery, joint_codes, noise_floor, tv_distance


def test_tv_distance_by_hand():
    assert tv_distance(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2) == pytest.approx(0.25)
    # unreadable entries (-1) are left out of each side's distribution: (2/3, 1/3) vs (0, 1)
    assert tv_distance(np.array([0, -1, 0, 1]), np.array([1, 1, -1, -1]), 2) == pytest.approx(2 / 3)
    assert tv_distance(np.array([2, 2]), np.array([0, 1]), 3) == pytest.approx(1.0)
    assert math.isnan(tv_distance(np.array([-1, -1]), np.array([0]), 2))
    with pytest.raises(ValueError, match="out of range"):
        tv_distance(np.array([3]), np.array([0]), 2)


def test_noise_floor_is_the_expected_distance_between_halves():
    assert noise_floor(np.zeros(10, int), 2, 5) == 0.0
    assert noise_floor(np.array([0, 1]), 2, 1) == 1.0  # every split puts one value on each side
    # four 0s and four 1s split 4/4: k zeros on the first side with hypergeometric odds, TV |2k - 4| / 4,
    # so the mean is (2 * 1 + 32 * 0.5) / 70
    assert noise_floor(np.array([0] * 4 + [1] * 4), 2, 4, splits=4000, seed=1) == pytest.approx(18 / 70, abs=0.02)
    with pytest.raises(ValueError, match="at least 8 base codes"):
        noise_floor(np.zeros(7, int), 2, 4)


def test_joint_codes_and_consistency_by_hand():
    joint, n = joint_codes(np.array([[1, 2], [0, -1], [2, 0]]), (3, 3))
    assert joint.tolist() == [5, -1, 6] and n == 9
    # gain of each value from -s to +s: [1 - 2, 3 - 1, 0 - 1] -> v+ = 1; seeds 0 and 1 move to it, none away
    assert consistency(np.array([0, 0, 1, 2]), np.array([1, 1, 1, 0]), 3) == (0.5, 0.0, 1)
    # seed 2 (unreadable at +s) is left out: of 3 pairs, gain [-1, 1] -> v+ = 1; seeds 0 and 3 move to it, seed 1 away
    assert consistency(np.array([0, 1, 0, 0]), np.array([1, 0, -1, 1]), 2) == pytest.approx((2 / 3, 1 / 3, 1))
    assert consistency(np.array([-1]), np.array([0]), 2) == (0.0, 0.0, None)


def test_distribution_recovery_sees_through_re_rolling():
    """Slider 0 moves factor a on every seed and re-rolls factor b without moving its distribution: per seed
    both change on every seed (purity 0.5), per distribution only a moves (purity 1). Slider 1 does nothing."""
    from conceptkit.toy.factors import factor_recovery

    minus = np.array([[[0, 0], [0, 0], [0, 1], [0, 1]], [[0, 0], [1, 1], [0, 1], [1, 0]]])
    plus = np.array([[[1, 1], [1, 1], [1, 0], [1, 0]], [[0, 0], [1, 1], [0, 1], [1, 0]]])
    base = np.zeros((8, 2), int)
    rec = distribution_recovery(minus, plus, base, {"a": (0,), "b": (1,)}, (2, 2), keys=("fa", "fb"))
    assert rec.floor.tolist() == [0.0, 0.0]
    assert rec.tv.tolist() == [[1.0, 0.0], [0.0, 0.0]] and rec.effect.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert rec.main == ["a", None] and rec.purity[0] == 1.0 and math.isnan(rec.purity[1])
    assert rec.toward.tolist() == [1.0, 0.0] and rec.against.tolist() == [0.0, 0.0] and rec.plus_value == [("fa", 1), None]
    per_seed = factor_recovery([[{"a": x, "b": y} for x, y in s] for s in minus], [[{"a": x, "b": y} for x, y in s] for s in plus],
                               {"a": ("a",), "b": ("b",)})
    assert per_seed.purity[0] == pytest.approx(0.5)


def test_distribution_recovery_subtracts_the_floor_and_joins_groups():
    """The base's factor b is half 0, half 1: its floor at n=4 is 18/70; a shift of b from all-0 to all-1 keeps
    1 - 18/70 of its TV distance. A joined group reads the joint value of its columns."""
    minus = np.array([[[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 0]]])
    plus = np.array([[[0, 1, 0], [0, 1, 1], [0, 1, 2], [0, 1, 0]]])
    base = np.array([[0, i % 2, 0] for i in range(8)])
    rec = distribution_recovery(minus, plus, base, {"a": (0,), "bc": (1, 2)}, (1, 2, 3), splits=4000, seed=3)
    assert rec.floor[0] == 0.0 and rec.floor[1] == pytest.approx(18 / 70, abs=0.02)
    assert rec.tv[0].tolist() == [0.0, 1.0]  # the joint (b, c) values of the two ends never meet
    assert rec.effect[0, 1] == pytest.approx(1 - rec.floor[1]) and rec.main == ["bc"] and rec.purity[0] == 1.0
    # consistency on the joined group's column with the largest TV (b): every seed moves to b = 1
    assert rec.toward[0] == 1.0 and rec.plus_value == [("1", 1)]
    with pytest.raises(ValueError, match=r"\(S, n, F\)"):
        distribution_recovery(minus[0], plus[0], base, {"a": (0,)}, (1, 2, 3))


def test_distribution_table_on_rendered_scenes():
    """Rendered world scenes read by the analyser: a red -> blue edit that keeps every other factor is a pure colour
    effect toward blue; one that also permutes the positions over the seeds keeps distribution purity 1 while
    per-seed purity halves."""
    from conceptkit.toy import factors, render, sample_scenes

    n = 24
    scenes = sample_scenes(n, seed=5)
    red = [dataclasses.replace(s, colour="red") for s in scenes]
    blue = [dataclasses.replace(s, colour="blue") for s in scenes]
    rolled = [dataclasses.replace(s, colour="blue", horizontal=t.horizontal, vertical=t.vertical, cx=t.cx, cy=t.cy)
              for s, t in zip(scenes, scenes[1:] + scenes[:1])]  # positions permuted over the seeds
    base = render(sample_scenes(2 * n, seed=6))
    tab = factors.distribution_table([render(red), render(red)], [render(blue), render(rolled)], base, [0, 1], ["red/blue", "left"], seed=0)
    clean, rolled_row = tab["per_slider"]
    assert clean["main"] == rolled_row["main"] == "colour" and clean["distribution_purity"] == 1.0
    assert clean["tv"]["colour"] == 1.0 and clean["effect"]["colour"] == pytest.approx(1.0 - tab["floor"]["colour"])
    assert clean["toward"] == 1.0 and clean["plus_value"] == "colour=blue" and clean["label_names_main"]
    assert rolled_row["distribution_purity"] == 1.0 and not rolled_row["label_names_main"]
    assert tab["n_above_floor"] == 2 and tab["coverage"] == ["colour"] and tab["labels_right"] == 1
    assert tab["seeds"] == n and tab["base_seeds"] == 2 * n and 0 < tab["floor"]["colour"] < 1
    per_seed = factors.table([render(red)], [render(rolled)], [1], ["left"])["per_slider"][0]
    assert per_seed["purity"] < 0.75


# ---------------------------------------------------------------- factor subspaces (`toy.subspaces`)


def test_mean_difference_basis_and_composition_by_hand():
    from conceptkit.toy.subspaces import captured, composition, mean_difference_basis, principal_cosines

    # three values sit at +e0, -e0 and +e0 + 2 e1 (plus a constant): their mean differences span {e0, e1}
    centres = np.array([[1.0, 0, 0, 5], [-1, 0, 0, 5], [1, 2, 0, 5]])
    x = np.repeat(centres, 4, axis=0)
    basis = mean_difference_basis(x, np.repeat([0, 1, 2], 4))
    assert basis.shape == (2, 4) and np.allclose(basis @ basis.T, np.eye(2))
    assert np.allclose(np.abs(basis[:, 2:]), 0)  # e2 and the constant e3 are not in it
    e = np.eye(4)
    # composition: squared length inside each span; a direction at 45 degrees between e0 and e2 is half inside
    comp = composition(np.array([e[0], (e[0] + e[2]) * 3, e[3], np.zeros(4)]), [basis, e[2:3]])
    assert np.allclose(comp, [[1, 0], [0.5, 0.5], [0, 0], [0, 0]])
    # principal angles: span{e0, e1} vs span{e0, (e1 + e2)/sqrt2}: cosines 1 and 1/sqrt2
    assert np.allclose(principal_cosines(e[:2], np.stack([e[0], (e[1] + e[2]) / np.sqrt(2)])), [1, 1 / np.sqrt(2)])
    assert captured(e[:2], e[1:2]) == pytest.approx(0.5) and captured(e[1:2], e[:2]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labels"):
        mean_difference_basis(x, np.zeros(3))


def test_decomposition_separates_overlapping_spans():
    from conceptkit.toy.subspaces import composition, decomposition

    e = np.eye(3)
    a, b = e[0:1], ((e[0] + e[1]) / np.sqrt(2))[None]  # two lines 45 degrees apart
    # a vector on line b projects half onto line a, but is carried by b alone
    assert np.allclose(composition(b, [a, b]), [[0.5, 1.0]])
    assert np.allclose(decomposition(b, [a, b]), [[0.0, 1.0]])
    # e1 = sqrt2 * b - a: parts of squared length 1 (a) and 2 (b); e2 lies outside both spans
    assert np.allclose(decomposition(np.stack([e[1], e[2]]), [a, b]), [[1 / 3, 2 / 3], [0, 0]])
    # orthogonal bases: the composition rescaled to sum to 1
    u = np.array([[1.0, 2.0, 3.0]])
    assert np.allclose(decomposition(u, [e[0:1], e[1:3]]), composition(u, [e[0:1], e[1:3]]))  # shares 1/14 and 13/14
